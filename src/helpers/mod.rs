//! The native helpers of DESIGN 2.3, registered on every policy engine.

mod lists;
mod queries;
mod safety;

use rhai::{Dynamic, EvalAltResult, Position};

use crate::context::Tripped;

pub use lists::register as register_lists;
pub use queries::register as register_queries;
pub use safety::{display, register as register_safety};

pub type HelperResult<T> = Result<T, Box<EvalAltResult>>;

pub fn terminated(t: Tripped) -> Box<EvalAltResult> {
    EvalAltResult::ErrorTerminated(Dynamic::from(t.token()), Position::NONE).into()
}

pub fn runtime(message: String) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(message.into(), Position::NONE).into()
}
