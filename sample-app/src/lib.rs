//! sample-app: an order service and three consuming services, showing
//! `outbox-relay` and `consumer-kit` end to end.
//!
//! - [`orders`]: the HTTP API; each change writes the order and its event in
//!   one transaction;
//! - [`consumers`]: inventory, notifications and analytics on consumer-kit,
//!   each in its own schema;
//! - [`demo`]: runs everything in one process and reports what happened;
//! - [`checkout`]: the checkout saga and the services it orchestrates;
//!   [`checkout_demo`] runs a few hundred checkouts through it.
#![forbid(unsafe_code)]

pub mod checkout;
pub mod checkout_demo;
pub mod consumers;
pub mod demo;
pub mod orders;
