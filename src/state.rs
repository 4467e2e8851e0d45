//! The cluster state as scripts see it (DESIGN 2.2), converted to Rhai values
//! once and then updated in place of a full reconversion.
//!
//! Every entry is a read-only record (see `record.rs`) and every array a
//! shared, read-only value: handing the state to a decision costs one
//! reference count per array instead of a copy of every worker, and a script
//! that tries to change the state gets an error instead of changing what the
//! next decision sees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rhai::{Array, Dynamic, ImmutableString, Map, FLOAT, INT};

use crate::convert::{dict_to_map, map_to_py, ConvertError};
use crate::errors::conversion_error;
use crate::record::Rec;

pub const STATE_KEYS: &[&str] = &["workers", "pools", "gpus", "models", "tenants", "queue", "now"];

/// An array handed to scripts: shared (passing it costs one reference count)
/// and read-only.
pub fn freeze_array(items: Array) -> Dynamic {
    Dynamic::from_array(items).into_read_only().into_shared()
}

fn record(map: Map) -> Dynamic {
    Dynamic::from(Rec::new(map))
}

/// Reads a field of a record or a map; `()` when absent.
pub fn field(value: &Dynamic, key: &str) -> Dynamic {
    if let Some(r) = value.read_lock::<Rec>() {
        return r.get(key).unwrap_or(Dynamic::UNIT);
    }
    match value.read_lock::<Map>() {
        Some(m) => m.get(key).cloned().unwrap_or(Dynamic::UNIT),
        None => Dynamic::UNIT,
    }
}

pub fn num(value: &Dynamic) -> Option<FLOAT> {
    if let Ok(i) = value.as_int() {
        Some(i as FLOAT)
    } else {
        value.as_float().ok()
    }
}

pub fn text(value: &Dynamic) -> Option<ImmutableString> {
    value.read_lock::<ImmutableString>().map(|s| s.clone())
}

pub fn is_eligible(status: &Dynamic) -> bool {
    matches!(text(status).as_deref(), Some("ready") | Some("busy"))
}

#[derive(Clone, Default)]
pub struct StateData {
    /// Workers in id order, each a frozen map.
    pub workers: Vec<(ImmutableString, Dynamic)>,
    pub pools: Vec<Dynamic>,
    pub gpus: Vec<Dynamic>,
    pub models: Vec<Dynamic>,
    pub tenants: Vec<Dynamic>,
    pub queue: Vec<Dynamic>,
    pub now: Option<INT>,
    pub gpu_index: HashMap<String, Dynamic>,
    /// GPUs given at the top level, kept to merge with the pools' own lists.
    pub top_gpus: Vec<Map>,
    /// Model id and every alias -> position in `models`.
    pub model_index: HashMap<String, usize>,
    pub tenant_index: HashMap<String, Dynamic>,
    // Derived arrays, rebuilt after every change so decisions only clone handles.
    pub all_workers_dyn: Dynamic,
    pub eligible: Vec<Dynamic>,
    pub eligible_dyn: Dynamic,
    pub pools_dyn: Dynamic,
    pub gpus_dyn: Dynamic,
    pub models_dyn: Dynamic,
    pub tenants_dyn: Dynamic,
    pub queue_dyn: Dynamic,
    /// Workers changed since the worker arrays were last built.
    pub workers_dirty: bool,
}

fn sort_by_id(items: &mut [Map]) {
    items.sort_by(|a, b| {
        let ka = a.get("id").map(|v| v.to_string()).unwrap_or_default();
        let kb = b.get("id").map(|v| v.to_string()).unwrap_or_default();
        ka.cmp(&kb)
    });
}

fn required_id(map: &Map, path: &str) -> Result<ImmutableString, ConvertError> {
    match map.get("id").and_then(text) {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(ConvertError {
            path: path.to_string(),
            message: "'id' is missing or is not a non-empty string".into(),
        }),
    }
}

/// Fills the derived worker fields: `status` defaults to ready, `active` to 0,
/// `slots` to 1, and `load` is `active / slots`.
pub fn normalise_worker(map: &mut Map) {
    if !map.get("status").map_or(false, |s| s.is_string()) {
        map.insert("status".into(), "ready".into());
    }
    // Counts may arrive as whole floats (`2.0`, as some JSON encoders write
    // them): keep their value instead of replacing it with the default.
    let count = |v: Option<&Dynamic>| {
        let v = v?;
        v.as_int().ok().or_else(|| {
            v.as_float().ok().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as INT)
        })
    };
    let active = count(map.get("active")).unwrap_or(0);
    let slots = count(map.get("slots")).unwrap_or(1);
    map.insert("active".into(), Dynamic::from_int(active));
    map.insert("slots".into(), Dynamic::from_int(slots));
    if !map.contains_key("load") {
        let load = if slots > 0 { active as FLOAT / slots as FLOAT } else { 1.0 };
        map.insert("load".into(), Dynamic::from_float(load));
    }
}

impl StateData {
    pub fn from_dict(d: &Bound<'_, PyDict>) -> Result<Self, ConvertError> {
        let mut path = String::from("state");
        let mut top = dict_to_map(d, &mut path, 0)?;
        for key in top.keys() {
            if !STATE_KEYS.contains(&key.as_str()) {
                return Err(ConvertError {
                    path: format!("state.{key}"),
                    message: format!("unknown key (known: {})", STATE_KEYS.join(", ")),
                });
            }
        }
        let mut state = StateData::default();
        let mut list = |name: &str| -> Result<Vec<Map>, ConvertError> {
            let Some(value) = top.remove(name) else { return Ok(Vec::new()) };
            if value.is_unit() {
                return Ok(Vec::new());
            }
            let array = value.try_cast::<Array>().ok_or_else(|| ConvertError {
                path: format!("state.{name}"),
                message: "expected a list".into(),
            })?;
            array
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    item.try_cast::<Map>().ok_or_else(|| ConvertError {
                        path: format!("state.{name}[{i}]"),
                        message: "expected a dict".into(),
                    })
                })
                .collect()
        };
        let workers = list("workers")?;
        let pools = list("pools")?;
        let gpus = list("gpus")?;
        let models = list("models")?;
        let tenants = list("tenants")?;
        let queue = list("queue")?;
        if let Some(now) = top.remove("now") {
            state.now = Some(now.as_int().map_err(|_| ConvertError {
                path: "state.now".into(),
                message: "expected an integer (milliseconds since the epoch)".into(),
            })?);
        }
        for (i, mut w) in workers.into_iter().enumerate() {
            let id = required_id(&w, &format!("state.workers[{i}]"))?;
            normalise_worker(&mut w);
            state.workers.push((id, record(w)));
        }
        state.workers.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = state.workers.windows(2).find(|p| p[0].0 == p[1].0) {
            return Err(ConvertError {
                path: "state.workers".into(),
                message: format!("worker id '{}' appears twice", pair[0].0),
            });
        }
        state.set_pools_and_gpus(pools, gpus)?;
        state.set_models(models)?;
        state.set_tenants(tenants)?;
        state.queue = queue.into_iter().map(|q| record(q)).collect();
        state.rebuild();
        Ok(state)
    }

    /// Sets pools and GPUs together: a pool's `gpus` and the top-level `gpus`
    /// both describe GPUs, and one listed in both places is one GPU.
    fn set_pools_and_gpus(
        &mut self,
        mut pools: Vec<Map>,
        top_gpus: Vec<Map>,
    ) -> Result<(), ConvertError> {
        sort_by_id(&mut pools);
        let mut all_gpus = Vec::new();
        for (i, p) in pools.iter().enumerate() {
            let pool_id = required_id(p, &format!("state.pools[{i}]"))?;
            let listed = p.get("gpus").and_then(|g| g.read_lock::<Array>().map(|a| a.clone()));
            for g in listed.unwrap_or_default() {
                if let Some(mut g) = g.try_cast::<Map>() {
                    g.entry("pool".into()).or_insert_with(|| pool_id.clone().into());
                    all_gpus.push((format!("state.pools[{i}].gpus"), g));
                }
            }
        }
        all_gpus.extend(top_gpus.iter().cloned().map(|g| ("state.gpus".to_string(), g)));
        self.top_gpus = top_gpus;
        self.pools = pools.into_iter().map(|p| record(p)).collect();
        self.gpus.clear();
        self.gpu_index.clear();
        for (path, mut g) in all_gpus {
            if !g.contains_key("id") {
                let pool = g.get("pool").and_then(text);
                let index = g.get("index").and_then(|v| v.as_int().ok());
                if let (Some(pool), Some(index)) = (pool, index) {
                    g.insert("id".into(), format!("{pool}/{index}").into());
                }
            }
            let id = required_id(&g, &path)?;
            if self.gpu_index.contains_key(id.as_str()) {
                continue;
            }
            let value = record(g);
            self.gpu_index.insert(id.to_string(), value.clone());
            self.gpus.push(value);
        }
        self.gpus.sort_by_key(|g| field(g, "id").to_string());
        Ok(())
    }

    fn pool_maps(&self) -> Vec<Map> {
        self.pools.iter().filter_map(|p| p.read_lock::<Rec>().map(|r| r.to_map())).collect()
    }

    fn set_models(&mut self, mut models: Vec<Map>) -> Result<(), ConvertError> {
        sort_by_id(&mut models);
        self.model_index.clear();
        for (i, m) in models.iter().enumerate() {
            let id = required_id(m, &format!("state.models[{i}]"))?;
            self.model_index.insert(id.to_string(), i);
            if let Some(aliases) =
                m.get("aliases").and_then(|a| a.read_lock::<Array>().map(|a| a.clone()))
            {
                for alias in aliases.iter().filter_map(text) {
                    self.model_index.entry(alias.to_string()).or_insert(i);
                }
            }
        }
        self.models = models.into_iter().map(|m| record(m)).collect();
        Ok(())
    }

    fn set_tenants(&mut self, mut tenants: Vec<Map>) -> Result<(), ConvertError> {
        sort_by_id(&mut tenants);
        self.tenant_index.clear();
        self.tenants.clear();
        for (i, t) in tenants.into_iter().enumerate() {
            let id = required_id(&t, &format!("state.tenants[{i}]"))?;
            let value = record(t);
            self.tenant_index.insert(id.to_string(), value.clone());
            self.tenants.push(value);
        }
        Ok(())
    }

    /// Rebuilds every array handed to scripts from the stored records.
    pub fn rebuild(&mut self) {
        self.rebuild_workers();
        self.rebuild_sections();
    }

    /// The worker arrays, which change with every slot taken or freed: they
    /// are rebuilt once before the next decision, not after every update
    /// (`State::snapshot`), so a burst of updates costs one pass.
    pub fn rebuild_workers(&mut self) {
        let all: Array = self.workers.iter().map(|(_, w)| w.clone()).collect();
        self.eligible = all.iter().filter(|w| is_eligible(&field(w, "status"))).cloned().collect();
        self.all_workers_dyn = freeze_array(all);
        self.eligible_dyn = freeze_array(self.eligible.clone());
        self.workers_dirty = false;
    }

    pub fn rebuild_sections(&mut self) {
        self.pools_dyn = freeze_array(self.pools.clone());
        self.gpus_dyn = freeze_array(self.gpus.clone());
        self.models_dyn = freeze_array(self.models.clone());
        self.tenants_dyn = freeze_array(self.tenants.clone());
        self.queue_dyn = freeze_array(self.queue.clone());
    }

    pub fn worker(&self, id: &str) -> Option<&Dynamic> {
        self.workers
            .binary_search_by(|(wid, _)| wid.as_str().cmp(id))
            .ok()
            .map(|i| &self.workers[i].1)
    }

    pub fn model(&self, reference: &str) -> Option<&Dynamic> {
        self.model_index.get(reference).map(|&i| &self.models[i])
    }

    /// Every name a model is known by: its id and aliases, or just `reference`
    /// when the catalogue does not list it.
    pub fn model_names(&self, reference: &str) -> Vec<ImmutableString> {
        let mut names = vec![ImmutableString::from(reference)];
        if let Some(m) = self.model(reference) {
            if let Some(id) = text(&field(m, "id")) {
                names.push(id);
            }
            if let Some(aliases) = field(m, "aliases").read_lock::<Array>() {
                names.extend(aliases.iter().filter_map(text));
            }
        }
        names
    }

    pub fn upsert_worker(&mut self, mut map: Map) -> Result<(), ConvertError> {
        let id = required_id(&map, "worker")?;
        normalise_worker(&mut map);
        let value = record(map);
        match self.workers.binary_search_by(|(wid, _)| wid.cmp(&id)) {
            Ok(i) => self.workers[i].1 = value,
            Err(i) => self.workers.insert(i, (id, value)),
        }
        self.workers_dirty = true;
        Ok(())
    }

    pub fn remove_worker(&mut self, id: &str) -> bool {
        match self.workers.binary_search_by(|(wid, _)| wid.as_str().cmp(id)) {
            Ok(i) => {
                let _removed = self.workers.remove(i);
                self.workers_dirty = true;
                true
            }
            Err(_) => false,
        }
    }
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
        let mut guard = self.data.lock().unwrap();
        if guard.workers_dirty {
            Arc::make_mut(&mut guard).rebuild_workers();
        }
        guard.clone()
    }

    fn update<T>(&self, f: impl FnOnce(&mut StateData) -> T) -> T {
        let mut guard = self.data.lock().unwrap();
        f(Arc::make_mut(&mut guard))
    }
}

fn dict_arg<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyDict>> {
    obj.cast::<PyDict>()
        .map(|d| d.clone())
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
