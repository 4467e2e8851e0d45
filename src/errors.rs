//! Errors cross into Python here, once: Rhai's parse and evaluation errors
//! become the exception classes of `rbee.errors`, each with the line and
//! column in the script.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule};
use rhai::{EvalAltResult, ParseError, Position};

use crate::context::Tripped;
use crate::convert::ConvertError;
use crate::limits::Limits;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let module = ERRORS.get_or_try_init(py, || py.import("rbee.errors").map(|m| m.unbind()))?;
    module.bind(py).getattr(name)
}

/// Builds `rbee.errors.<name>(message, line, column, **extra)`.
pub fn build(
    py: Python<'_>,
    name: &str,
    message: &str,
    pos: Position,
    extra: &[(&str, Py<PyAny>)],
) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("line", pos.line())?;
        kwargs.set_item("column", pos.position())?;
        for (k, v) in extra {
            kwargs.set_item(*k, v)?;
        }
        let value = class(py, name)?.call((message,), Some(&kwargs))?;
        Ok(PyErr::from_value(value))
    })();
    made.unwrap_or_else(|e| e)
}

pub fn conversion_error(py: Python<'_>, e: &ConvertError) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("path", &e.path)?;
        let value = class(py, "ValueConversionError")?.call((e.to_string(),), Some(&kwargs))?;
        Ok(PyErr::from_value(value))
    })();
    made.unwrap_or_else(|e| e)
}

/// A compile error, with a clearer message for what the sandbox forbids.
pub fn parse_message(err: &ParseError, source: &str) -> String {
    let message = err.err_type().to_string();
    let word_at = |pos: Position| -> Option<String> {
        let line = source.lines().nth(pos.line()?.checked_sub(1)?)?;
        let col = pos.position()?.checked_sub(1)?;
        let rest: String = line.chars().skip(col).collect();
        Some(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
    };
    match word_at(err.position()).as_deref() {
        Some("eval") => {
            "'eval' is not allowed in policies: the sandbox refuses code built at run time".into()
        }
        Some("import") => {
            "'import' is not allowed in policies: the sandbox has no access to files or modules"
                .into()
        }
        _ => message,
    }
}

/// What to call the innermost error, and where it happened.
fn innermost(err: &EvalAltResult) -> (&EvalAltResult, Position, Vec<String>) {
    let mut chain = Vec::new();
    let mut current = err;
    let mut pos = err.position();
    while let EvalAltResult::ErrorInFunctionCall(name, _, inner, call_pos) = current {
        if !name.starts_with("anon$") {
            chain.push(name.clone());
        }
        if !call_pos.is_none() {
            pos = *call_pos;
        }
        current = inner;
    }
    if !current.position().is_none() {
        pos = current.position();
    }
    (current, pos, chain)
}

/// Maps an evaluation error to its Python class and message.
pub fn classify(err: &EvalAltResult, limits: &Limits) -> (&'static str, String, Position) {
    let (inner, pos, chain) = innermost(err);
    let (class, message) = match inner {
        EvalAltResult::ErrorTerminated(token, _) => {
            let tripped = match token.to_string().as_str() {
                "rbee:operations" => Tripped::Operations,
                "rbee:memory" => Tripped::Memory,
                "rbee:data" => Tripped::Data,
                _ => Tripped::Timeout,
            };
            limit_message(tripped, limits)
        }
        EvalAltResult::ErrorTooManyOperations(_) => limit_message(Tripped::Operations, limits),
        EvalAltResult::ErrorDataTooLarge(what, _) => ("DataTooLarge", data_message(what, limits)),
        EvalAltResult::ErrorStackOverflow(_) => (
            "StackOverflow",
            format!("more than {} nested function calls (max_call_levels)", limits.max_call_levels),
        ),
        other => {
            let mut message = other.to_string();
            let suffix = format!(" ({})", other.position());
            if !other.position().is_none() && message.ends_with(&suffix) {
                message.truncate(message.len() - suffix.len());
            }
            ("PolicyRuntimeError", message)
        }
    };
    let message =
        if chain.is_empty() { message } else { format!("{message} (in {})", chain.join(" -> ")) };
    (class, message, pos)
}

fn limit_message(t: Tripped, limits: &Limits) -> (&'static str, String) {
    match t {
        Tripped::Timeout => (
            "PolicyTimeout",
            format!("decision ran longer than {} ms (timeout_ms)", limits.timeout.as_millis()),
        ),
        Tripped::Operations => (
            "TooManyOperations",
            format!("decision ran more than {} operations (max_operations)", limits.max_operations),
        ),
        Tripped::Memory => (
            "MemoryLimitExceeded",
            format!("script allocated more than {} bytes (memory_bytes)", limits.memory_bytes),
        ),
        Tripped::Data => ("DataTooLarge", data_message("Length of string", limits)),
    }
}

fn data_message(what: &str, limits: &Limits) -> String {
    format!(
        "{what} is over the sandbox limit (strings {} bytes, arrays {} items, maps {} entries)",
        limits.max_string_bytes, limits.max_array_items, limits.max_map_entries
    )
}
