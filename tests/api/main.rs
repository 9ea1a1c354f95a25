//! The integration tests, one binary (as zero-to-production's `tests/api/`): one module per
//! area, the harness in [`common`]. They talk to the real RabbitMQ on 127.0.0.1:5672 (and the
//! private Redis and PostgreSQL `scripts/ensure-stores.sh` starts); each test uses its own
//! randomly suffixed names. The fault suite (`faults`, ignored by default) restarts the broker
//! and runs one scenario at a time: `cargo test --test api -- --ignored --test-threads=1 faults::`.

mod common;
mod configuration_doc;

mod approvals_e2e;
mod architecture;
mod audit_metrics_e2e;
mod bad_input_e2e;
mod binary_e2e;
mod builds_the_image;
mod canary_e2e;
mod cluster;
mod console_e2e;
mod control_e2e;
mod cuts_e2e;
mod definitions_e2e;
mod delivery_e2e;
mod deploy_manifests;
mod faults;
mod grants_e2e;
mod idempotency_e2e;
mod incident_e2e;
mod judges_bridge_e2e;
mod judges_eval;
mod limits_e2e;
mod llm_judge;
mod loosening_e2e;
mod mcp_e2e;
mod policy_lifecycle_e2e;
mod properties;
mod publisher_e2e;
mod runs_as_shipped;
mod scripts_e2e;
mod security_e2e;
mod soak;
mod sop_e2e;
mod state_log_e2e;
