//! The Python face of the state: `rbee._engine.State`, which holds a
//! `StateData` behind a lock, checks what Python hands it and answers Python
//! errors (`ValueConversionError` with the field's path, `KeyError` for an
//! unknown worker, `TypeError` for an argument of the wrong kind).

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyInt};
use rhai::{Dynamic, ImmutableString, Map, FLOAT, INT};

use super::{text, whole, StateData, STATE_KEYS};
use crate::convert::{dict_to_map, map_to_py, ConvertError};
use crate::errors::conversion_error;

/// What `update_worker` may not get wrong: the fields it normalises must have
/// the types a worker's fields have, and the id cannot change.
fn check_update(id: &str, fields: &Map) -> Result<(), ConvertError> {
    for (key, value) in fields {
        let expected = match key.as_str() {
            "id" if text(value).as_deref() == Some(id) => continue,
            "id" => "no other id (an id cannot change: remove the worker, upsert the new one)",
            "status" if value.is_string() => continue,
            "status" => "a string",
            // A negative count would make `load` negative: the busiest
            // worker would look the idlest.
            "active" | "slots" if whole(value).is_some_and(|n| n >= 0) => continue,
            "active" | "slots" => "a whole number, 0 or more",
            "load" if value.is_int() || value.is_float() => continue,
            "load" => "a number",
            _ => continue,
        };
        return Err(ConvertError {
            path: format!("worker['{id}'].{key}"),
            message: format!("expected {expected}, got {}", python_repr(value)),
        });
    }
    Ok(())
}

/// A value for an error message, with the name of its Python type.
fn python_repr(value: &Dynamic) -> String {
    let (shown, kind) = match value.type_name() {
        "()" => ("None".to_string(), "NoneType"),
        "bool" => (if value.as_bool().unwrap_or(false) { "True" } else { "False" }.into(), "bool"),
        "string" => (format!("{value:?}"), "str"),
        "i64" => (value.to_string(), "int"),
        "f64" => (value.to_string(), "float"),
        "array" => ("[...]".into(), "list"),
        "map" => ("{...}".into(), "dict"),
        other => (value.to_string(), other),
    };
    format!("{shown} ({kind})")
}

/// The Python `State`: a snapshot converted once, updated incrementally.
///
/// Decisions take the current `Arc` and so see one consistent snapshot even if
/// another thread updates the state meanwhile; an update copies the handle
/// vectors (not the maps) when a decision still holds the old snapshot.
#[pyclass(module = "rbee._engine", name = "State", frozen)]
pub struct State {
    pub data: Mutex<Arc<StateData>>,
}

impl State {
    pub fn snapshot(&self) -> Arc<StateData> {
        self.data.lock().unwrap().clone()
    }

    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut StateData) -> T) -> T {
        let mut guard = self.data.lock().unwrap();
        f(Arc::make_mut(&mut guard))
    }
}

/// A number argument as the state keeps it: an int stays an int, as it
/// would through `update_worker`.
fn number_arg(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Dynamic>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    if obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>() {
        return Ok(Some(Dynamic::from_int(obj.extract()?)));
    }
    match obj.extract::<FLOAT>() {
        Ok(f) if !obj.is_instance_of::<PyBool>() => Ok(Some(Dynamic::from_float(f))),
        _ => Err(PyTypeError::new_err(format!(
            "{name} must be a number or None, not {}",
            obj.get_type().name()?
        ))),
    }
}

fn dict_arg<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyDict>> {
    obj.cast::<PyDict>()
        .cloned()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a dict")))
}

#[pymethods]
impl State {
    #[new]
    #[pyo3(signature = (snapshot = None))]
    fn new(py: Python<'_>, snapshot: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let data = match snapshot {
            Some(s) => StateData::from_dict(&dict_arg(s, "state")?)
                .map_err(|e| conversion_error(py, &e))?,
            None => {
                let mut d = StateData::default();
                d.rebuild();
                d
            }
        };
        Ok(State { data: Mutex::new(Arc::new(data)) })
    }

    /// Adds a worker or replaces the one with the same id.
    fn upsert_worker(&self, py: Python<'_>, worker: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut path = String::from("worker");
        let map = dict_to_map(&dict_arg(worker, "worker")?, &mut path, 0)
            .map_err(|e| conversion_error(py, &e))?;
        self.update(|s| s.upsert_worker(map)).map_err(|e| conversion_error(py, &e))
    }

    /// Changes some fields of a worker: `fields` are merged into what it has
    /// (see `StateData::update_worker`); KeyError when no worker has that id.
    fn update_worker(
        &self,
        py: Python<'_>,
        worker_id: &str,
        fields: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut path = format!("worker['{worker_id}']");
        let map = dict_to_map(&dict_arg(fields, "fields")?, &mut path, 0)
            .and_then(|m| check_update(worker_id, &m).map(|()| m))
            .map_err(|e| conversion_error(py, &e))?;
        match self.update(|s| s.update_worker(worker_id, map)) {
            Some(()) => Ok(()),
            None => Err(PyKeyError::new_err(format!("no worker with id '{worker_id}'"))),
        }
    }

    /// What `update_worker` does with `active`, `status`, `last_used_at`,
    /// `latency_ms` and `tokens_per_sec`, for the queen's updates on every
    /// job it starts and ends: plain arguments instead of a dict to convert
    /// (`None` leaves a field as it is). KeyError when no worker has that id.
    #[pyo3(signature = (worker_id, active, status, last_used_at = None, latency_ms = None,
                        tokens_per_sec = None))]
    #[allow(clippy::too_many_arguments)]
    fn update_slots(
        &self,
        py: Python<'_>,
        worker_id: &str,
        active: INT,
        status: &str,
        last_used_at: Option<INT>,
        latency_ms: Option<&Bound<'_, PyAny>>,
        tokens_per_sec: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if active < 0 {
            // Refused as `update_worker` refuses it, with the same message.
            let fields = Map::from_iter([("active".into(), Dynamic::from_int(active))]);
            check_update(worker_id, &fields).map_err(|e| conversion_error(py, &e))?;
        }
        let status = ImmutableString::from(status);
        let learned =
            (number_arg(latency_ms, "latency_ms")?, number_arg(tokens_per_sec, "tokens_per_sec")?);
        match self.update(|s| s.update_slots(worker_id, active, &status, last_used_at, learned)) {
            Some(()) => Ok(()),
            None => Err(PyKeyError::new_err(format!("no worker with id '{worker_id}'"))),
        }
    }

    /// Removes a worker; KeyError when no worker has that id.
    fn remove_worker(&self, worker_id: &str) -> PyResult<()> {
        if self.update(|s| s.remove_worker(worker_id)) {
            Ok(())
        } else {
            Err(PyKeyError::new_err(format!("no worker with id '{worker_id}'")))
        }
    }

    /// Replaces one of the other sections (pools, gpus, models, tenants, queue).
    fn replace(&self, py: Python<'_>, section: &str, items: &Bound<'_, PyAny>) -> PyResult<()> {
        if section == "workers" || !STATE_KEYS.contains(&section) || section == "now" {
            return Err(PyKeyError::new_err(format!(
                "cannot replace '{section}' (use upsert_worker for workers; \
                 sections: pools, gpus, models, tenants, queue)"
            )));
        }
        let wrapper = PyDict::new(py);
        wrapper.set_item(section, items)?;
        let parsed = StateData::from_dict(&wrapper).map_err(|e| conversion_error(py, &e))?;
        self.update(|s| {
            match section {
                "pools" => {
                    let top = std::mem::take(&mut s.top_gpus);
                    s.set_pools_and_gpus(parsed.pool_maps(), top)?;
                }
                "gpus" => s.set_pools_and_gpus(s.pool_maps(), parsed.top_gpus)?,
                "models" => {
                    s.models = parsed.models;
                    s.model_index = parsed.model_index;
                }
                "tenants" => {
                    s.tenants = parsed.tenants;
                    s.tenant_index = parsed.tenant_index;
                }
                _ => s.queue = parsed.queue,
            }
            s.rebuild_sections();
            Ok(())
        })
        .map_err(|e| conversion_error(py, &e))
    }

    /// The number of workers, whatever their status.
    fn __len__(&self) -> usize {
        self.snapshot().workers.len()
    }

    /// The state as plain Python data, as scripts see it.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.snapshot();
        let mut m = Map::new();
        m.insert("workers".into(), s.all_workers_dyn.clone());
        m.insert("pools".into(), s.pools_dyn.clone());
        m.insert("gpus".into(), s.gpus_dyn.clone());
        m.insert("models".into(), s.models_dyn.clone());
        m.insert("tenants".into(), s.tenants_dyn.clone());
        m.insert("queue".into(), s.queue_dyn.clone());
        map_to_py(py, &m)
    }
}
