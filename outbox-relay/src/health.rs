//! [`Health`]: what `/healthz` and `/readyz` report.

use std::sync::{
    atomic::{AtomicU8, Ordering},
    Mutex,
};

/// The relay's state, as seen by readiness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Connecting for the first time.
    Starting = 0,
    /// Connected, owning no partition: other relays own them all.
    Standby = 1,
    /// Claiming and publishing.
    Active = 2,
    /// Database or broker unavailable; retrying with backoff.
    Degraded = 3,
    /// Shutting down.
    Stopping = 4,
}

/// Shared health state, updated by the relay loop.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    reason: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(State::Starting as u8),
            reason: Mutex::new("starting".into()),
        }
    }
}

impl Health {
    /// Sets the state and a one-line reason (never a secret).
    pub fn set(&self, state: State, reason: impl Into<String>) {
        self.state.store(state as u8, Ordering::Relaxed);
        *self.reason.lock().expect("health reason") = reason.into();
    }

    /// The current state.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Starting,
            1 => State::Standby,
            2 => State::Active,
            3 => State::Degraded,
            _ => State::Stopping,
        }
    }

    /// The current reason.
    pub fn reason(&self) -> String {
        self.reason.lock().expect("health reason").clone()
    }

    /// Ready means: connected and either publishing or on standby.
    pub fn is_ready(&self) -> bool {
        matches!(self.state(), State::Active | State::Standby)
    }
}
