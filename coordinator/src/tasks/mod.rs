//! Tasks before they run: the spec file a submitter writes, and where the task goes.
//!
//! - [`spec`]: the TOML/JSON spec file → [`TaskSpec`](drover_protocol::task::TaskSpec)
//!   (documented in docs/task-spec.md, examples in examples/);
//! - [`validate`]: the rules every spec follows, re-checked by the coordinator on arrival;
//! - [`inputs`]: the files a spec ships, found and sized against the input limit;
//! - [`units`]: human sizes and durations (`"2GiB"`, `"1h30m"`) for spec files and messages;
//! - [`oom`]: what an OOM kill leads to under `retry.on_oom`, and the retry's memory;
//! - [`acceptance`]: the acceptance loop and the verdict as the session tells them;
//! - [`placement`]: which ready worker with free capacity takes a task, and in [`wait`] the
//!   one-line reason when none does. Pure: no I/O, no clock.

pub mod acceptance;
mod index;
pub mod inputs;
pub mod lifecycle;
pub mod oom;
pub mod placement;
pub mod spec;
pub mod units;
pub mod validate;
pub mod wait;

pub use inputs::{pack_inputs, resolve_inputs, InputFile, MAX_INPUT_BYTES};
pub use placement::{demand, pick_next, place, Placement, QueuedTask, WorkerView};
pub use spec::{load_spec, parse_spec, LoadedSpec, SpecError, SpecFormat};
pub use validate::{validate_spec, InvalidField};
pub use wait::{Blocker, Checked, WaitReason};
