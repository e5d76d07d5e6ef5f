//! The sampo node: configuration, identity, and the service that wires storage,
//! the model runtime, the mesh and the HTTP API together.

pub mod admission;
pub mod api;
pub mod audit;
pub mod backend;
pub mod config;
pub mod executor;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod runtime;
pub mod service;
pub mod trust;

pub use config::Config;
