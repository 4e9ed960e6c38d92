//! A `metrics` recorder that keeps every raw sample of the relay's
//! commit-to-ack histogram, so percentiles are exact rather than bucketed.

use std::sync::{Arc, Mutex};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use outbox_relay::telemetry::COMMIT_TO_ACK;

/// The raw commit-to-ack samples, in seconds.
#[derive(Debug, Default)]
pub struct Samples(Mutex<Vec<f64>>);

impl Samples {
    /// Drops every sample so far.
    pub fn clear(&self) {
        self.0.lock().expect("samples").clear();
    }

    /// How many samples so far.
    pub fn len(&self) -> usize {
        self.0.lock().expect("samples").len()
    }

    /// Takes every sample so far.
    pub fn take(&self) -> Vec<f64> {
        std::mem::take(&mut *self.0.lock().expect("samples"))
    }
}

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().expect("samples").push(value);
    }
}

struct SampleRecorder(Arc<Samples>);

impl Recorder for SampleRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == COMMIT_TO_ACK {
            Histogram::from_arc(self.0.clone())
        } else {
            Histogram::noop()
        }
    }
}

/// Installs the recorder globally and returns its samples.
pub fn install() -> Arc<Samples> {
    let samples = Arc::new(Samples::default());
    metrics::set_global_recorder(SampleRecorder(samples.clone()))
        .expect("no other recorder installed");
    samples
}
