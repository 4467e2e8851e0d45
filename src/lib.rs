//! `rbee._engine`: the Rhai scheduling engine of rbee, as a Python extension.
//!
//! Python sees four things: `State` (the cluster snapshot, converted once),
//! `CompiledPolicy` (a sandboxed policy that makes decisions), `evaluate`
//! (run a script in the sandbox) and `simulate` (the event loop of
//! `rbee simulate`). Everything else is in the `rbee` package.

mod alloc;
mod context;
mod convert;
mod errors;
mod helpers;
mod limits;
mod native;
mod policy;
mod record;
mod simulate;
mod state;
mod verdict;

use pyo3::prelude::*;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if !record::hot_slots_agree() {
        return Err(pyo3::exceptions::PyImportError::new_err(
            "rbee._engine: record::hot_slot and record::HOT disagree (a build error)",
        ));
    }
    m.add_class::<state::State>()?;
    m.add_class::<policy::CompiledPolicy>()?;
    m.add_function(wrap_pyfunction!(policy::evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::simulate, m)?)?;
    m.add("RHAI_VERSION", "1.27.0")?;
    Ok(())
}
