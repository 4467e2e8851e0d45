//! The cluster state as scripts see it (DESIGN 2.2), converted to Rhai values
//! once and then updated in place of a full reconversion.
//!
//! Every entry is a read-only record (see `record.rs`) and every array a
//! shared, read-only value: handing the state to a decision costs one
//! reference count per array instead of a copy of every worker, and a script
//! that tries to change the state gets an error instead of changing what the
//! next decision sees.
//!
//! `StateData` is the state and its updates; `python.rs` is the `State`
//! class Python holds it through.

mod python;

use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rhai::{Array, Dynamic, ImmutableString, Map, FLOAT, INT};

use crate::convert::{dict_to_map, ConvertError};
use crate::record::{
    hot_slot, is_volatile, Rec, ACTIVE, HOT, LAST_USED_AT, LATENCY_MS, LOAD, SLOTS, STATUS,
    TOKENS_PER_SEC, VOLATILE,
};

pub use python::State;

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
    // Asking the type first: a failed `as_int` works out a type name.
    if value.is_float() {
        value.as_float().ok()
    } else {
        value.as_int().ok().map(|i| i as FLOAT)
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
    // The arrays handed to scripts, kept up to date with every change so a
    // decision only clones handles. The worker arrays are edited in place
    // (see `edit_frozen`); the other sections are rebuilt when replaced.
    /// Every worker, in id order.
    pub all_workers_dyn: Dynamic,
    /// The `ready` and `busy` workers, in id order.
    pub eligible_dyn: Dynamic,
    pub pools_dyn: Dynamic,
    pub gpus_dyn: Dynamic,
    pub models_dyn: Dynamic,
    pub tenants_dyn: Dynamic,
    pub queue_dyn: Dynamic,
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

/// A count: an integer, or a whole float (`2.0`, as some JSON encoders write
/// counts), whose value is kept instead of being replaced by a default.
fn whole(value: &Dynamic) -> Option<INT> {
    value.as_int().ok().or_else(|| {
        value.as_float().ok().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as INT)
    })
}

/// Fills the derived worker fields: `status` defaults to ready, `active` to 0,
/// `slots` to 1, and `load` is `active / slots`.
pub fn normalise_worker(map: &mut Map) {
    if !map.get("status").is_some_and(|s| s.is_string()) {
        map.insert("status".into(), "ready".into());
    }
    let active = map.get("active").and_then(whole).unwrap_or(0);
    let slots = map.get("slots").and_then(whole).unwrap_or(1);
    map.insert("active".into(), Dynamic::from_int(active));
    map.insert("slots".into(), Dynamic::from_int(slots));
    if !map.contains_key("load") {
        map.insert("load".into(), Dynamic::from_float(load_of(active, slots)));
    }
}

/// The load of a worker with `active` jobs on `slots` slots (full without slots).
fn load_of(active: INT, slots: INT) -> FLOAT {
    if slots > 0 {
        active as FLOAT / slots as FLOAT
    } else {
        1.0
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
        state.queue = queue.into_iter().map(record).collect();
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
        self.pools = pools.into_iter().map(record).collect();
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
        self.models = models.into_iter().map(record).collect();
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

    /// Builds the worker arrays from scratch: O(workers), so only when the
    /// state is built; changes to single workers edit them (`put_worker`).
    pub fn rebuild_workers(&mut self) {
        let all: Array = self.workers.iter().map(|(_, w)| w.clone()).collect();
        let eligible = all.iter().filter(|w| is_eligible(&field(w, "status"))).cloned().collect();
        self.all_workers_dyn = freeze_array(all);
        self.eligible_dyn = freeze_array(eligible);
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
        self.put_worker(id, map);
        Ok(())
    }

    /// Merges `fields` (checked by `check_update`) into the worker `id`, and
    /// normalises the result as `upsert_worker` does. A change of `active` or
    /// `slots` without a `load` recomputes the load. `None`: no such worker.
    pub fn update_worker(&mut self, id: &str, fields: Map) -> Option<()> {
        let i = self.workers.binary_search_by(|(wid, _)| wid.as_str().cmp(id)).ok()?;
        let (id, old) = &self.workers[i];
        let old = old.read_lock::<Rec>().map(|r| r.clone());
        let derived_load = !fields.contains_key("load")
            && (fields.contains_key("active") || fields.contains_key("slots"));
        if let Some(rec) = old.as_ref().filter(|_| fields.keys().all(|k| is_volatile(k))) {
            // Only volatile fields change: normalise them among themselves
            // (with the worker's `slots`, which `normalise_worker` reads) and
            // keep the rest of the record as it is.
            let mut small: Map = VOLATILE
                .iter()
                .chain(&[SLOTS])
                .filter_map(|&s| rec.slot(s).map(|v| (HOT[s].into(), v.clone())))
                .collect();
            small.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            if derived_load {
                small.remove("load");
            }
            normalise_worker(&mut small);
            small.remove("slots");
            // Every key left is volatile: the fields were checked above, and
            // normalising adds only slot fields.
            let updated = rec.with_vol(|vol| {
                for (key, value) in small {
                    if let Some(slot) = hot_slot(&key) {
                        vol[slot] = Some(value);
                    }
                }
            });
            self.replace_worker(i, Dynamic::from(updated));
            return Some(());
        }
        let mut map = old.map(|r| r.fields_map()).unwrap_or_default();
        map.extend(fields);
        if derived_load {
            map.remove("load");
        }
        normalise_worker(&mut map);
        self.put_worker(id.clone(), map);
        Some(())
    }

    /// `update_worker(id, {active, status, last_used_at, latency_ms,
    /// tokens_per_sec})` for a caller that has the values already (the
    /// simulator on every dispatch and completion, the queen on every job it
    /// starts and ends): the same record, without making and reading a map.
    /// `None` leaves a field as it is. `None` answered: no such worker.
    pub fn update_slots(
        &mut self,
        id: &str,
        active: INT,
        status: &ImmutableString,
        last_used_at: Option<INT>,
        (latency_ms, tokens_per_sec): (Option<Dynamic>, Option<Dynamic>),
    ) -> Option<()> {
        let i = self.workers.binary_search_by(|(wid, _)| wid.as_str().cmp(id)).ok()?;
        let rec = self.workers[i].1.read_lock::<Rec>()?.clone();
        let slots = rec.slot(SLOTS).and_then(whole).unwrap_or(1);
        let updated = rec.with_vol(|vol| {
            vol[STATUS] = Some(Dynamic::from(status.clone()));
            vol[ACTIVE] = Some(Dynamic::from_int(active));
            vol[LOAD] = Some(Dynamic::from_float(load_of(active, slots)));
            if let Some(at) = last_used_at {
                vol[LAST_USED_AT] = Some(Dynamic::from_int(at));
            }
            if latency_ms.is_some() {
                vol[LATENCY_MS] = latency_ms;
            }
            if tokens_per_sec.is_some() {
                vol[TOKENS_PER_SEC] = tokens_per_sec;
            }
        });
        self.replace_worker(i, Dynamic::from(updated));
        Some(())
    }

    pub fn remove_worker(&mut self, id: &str) -> bool {
        let Ok(i) = self.workers.binary_search_by(|(wid, _)| wid.as_str().cmp(id)) else {
            return false;
        };
        let (id, old) = self.workers.remove(i);
        let was_eligible = is_eligible(&field(&old, "status"));
        self.sync_arrays(i, &id, None, was_eligible, false);
        true
    }

    /// Stores a normalised worker in place of the one with the same id, or
    /// adds it at its place in id order.
    fn put_worker(&mut self, id: ImmutableString, map: Map) {
        let value = record(map);
        match self.workers.binary_search_by(|(wid, _)| wid.cmp(&id)) {
            Ok(i) => self.replace_worker(i, value),
            Err(i) => {
                self.workers.insert(i, (id.clone(), value.clone()));
                self.sync_arrays(i, &id, Some(value), false, false);
            }
        }
    }

    /// Puts `value` in the place of the worker at `index` (the same id).
    fn replace_worker(&mut self, index: usize, value: Dynamic) {
        let old = std::mem::replace(&mut self.workers[index].1, value.clone());
        let was_eligible = is_eligible(&field(&old, "status"));
        let id = self.workers[index].0.clone();
        self.sync_arrays(index, &id, Some(value), was_eligible, true);
    }

    /// Brings the worker arrays in line with one change to `workers`: the
    /// worker at `index` was replaced (`existed`), added, or removed (`value`
    /// is `None`). The eligible array holds a worker at its place in id order
    /// while its status is `ready` or `busy`, so a change of status moves it
    /// in or out. Each edit is O(1) for a replacement and a move of handles
    /// for an insertion or a removal; should an array not match `workers`
    /// (never expected), both are rebuilt instead.
    fn sync_arrays(
        &mut self,
        index: usize,
        id: &str,
        value: Option<Dynamic>,
        was_eligible: bool,
        existed: bool,
    ) {
        let expected = self.workers.len();
        let consistent = edit_frozen(&mut self.all_workers_dyn, |all| {
            match (&value, existed) {
                (Some(v), true) if index < all.len() && record_id(&all[index]) == id => {
                    all[index] = frozen(v)
                }
                (Some(v), false) if index <= all.len() => all.insert(index, frozen(v)),
                (None, _) if index < all.len() && record_id(&all[index]) == id => {
                    drop(all.remove(index))
                }
                _ => return false,
            }
            all.len() == expected
        });
        let eligible = value.as_ref().filter(|v| is_eligible(&field(v, "status")));
        let consistent = consistent
            && ((!was_eligible && eligible.is_none())
                || edit_frozen(&mut self.eligible_dyn, |items| {
                    match (items.binary_search_by(|w| record_id(w).as_str().cmp(id)), eligible) {
                        (Ok(at), Some(v)) => items[at] = frozen(v),
                        (Err(at), Some(v)) => items.insert(at, frozen(v)),
                        (Ok(at), None) => drop(items.remove(at)),
                        (Err(_), None) => {}
                    }
                    true
                }));
        if !consistent {
            self.rebuild_workers();
        }
    }
}

/// The id of a record; empty for anything else.
fn record_id(value: &Dynamic) -> ImmutableString {
    value
        .read_lock::<Rec>()
        .and_then(|r| r.slot(crate::record::ID).and_then(text))
        .unwrap_or_default()
}

/// Changes a frozen array; what `edit` puts in must be read-only (`frozen`).
/// When nothing else holds the array, it is changed where it is, without a
/// copy; when a decision still holds it (its snapshot of the state), a copy
/// is changed and the decision keeps seeing what it started with. Answers
/// what `edit` answers (whether the array was as expected), or `false` for
/// a handle that holds no array.
fn edit_frozen(handle: &mut Dynamic, edit: impl FnOnce(&mut Array) -> bool) -> bool {
    // `flatten` takes the array out of its shared cell when this handle is
    // the only one, still read-only, elements included; otherwise it copies
    // it, and a copy is read-write (Rhai's `clone`), so it must be frozen
    // again, element by element. Doing that on every edit would be O(workers).
    let mut array = std::mem::take(handle).flatten();
    let copied = !array.is_read_only();
    let ok = match array.write_lock::<Array>() {
        Some(mut items) => edit(&mut items),
        None => false,
    };
    *handle = if copied { array.into_read_only() } else { array }.into_shared();
    ok
}

/// A read-only handle to a record, to put in a frozen array: a clone is
/// read-write, and a script could assign to it in place.
fn frozen(value: &Dynamic) -> Dynamic {
    value.clone().into_read_only()
}
