//! testbed: one topology file to a running, verified multi-machine cluster.
//!
//! The pipeline of `up`, one module per stage: `topology` (parse into the
//! `model`) → `plan` (resolve once what to do to every machine, daemon and
//! the build) → `build` → `image` → `provider` (boot) → `identity` → `ssh` →
//! `provision` (kits, then the machines' own `provisioners`, in dependency
//! order) → `check`, with `state` recording how far each machine got.
//! `vagrant` turns a Vagrantfile into a topology. `lifecycle` carries the plan out; `cli` is on
//! top. No module imports one above it (`tests/module_graph.rs`).

pub mod build;
pub mod check;
pub mod cli;
pub mod files;
pub mod graph;
pub mod green;
pub mod identity;
pub mod image;
pub mod inventory;
pub mod kit;
pub mod library;
pub mod lifecycle;
pub mod model;
pub mod plan;
pub mod process;
pub mod progress;
pub mod provider;
pub mod provision;
pub mod provisioners;
pub mod settings;
pub mod snapshot;
pub mod ssh;
pub mod state;
pub mod topology;
pub mod vagrant;
