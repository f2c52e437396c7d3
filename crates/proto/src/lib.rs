//! Wire types shared by `ops-meta`, `ops-updater` and the tools, and the validation both
//! sides of the wire apply to them.
//!
//! This crate is the only place that knows JSON field names. It does no IO and pulls in
//! no runtime, so every other crate can depend on it freely. Names from the wire become
//! the validated types of [`names`]; the limits both sides check live in [`rules`].

pub mod bootagent;
pub mod events;
pub mod legacy;
pub mod limits;
pub mod names;
pub mod ops;
pub mod rollout;
pub mod rules;
pub mod validate;

pub use names::{AgentName, Hostname, Serial, Version};
pub use validate::{
    clean_text, validate_agent_name, validate_hostname, validate_version, NameError,
};
