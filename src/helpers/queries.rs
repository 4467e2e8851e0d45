//! Helpers that read the global state (GPUs, tenants, models), build
//! decisions and actions, and small utilities. Unknown ids give `()` or
//! `false`, never an error.

use rhai::{Array, Dynamic, Engine, FuncRegistration, ImmutableString, Map, FLOAT, INT};

use super::{runtime, HelperResult};
use crate::context::{self, stable_hash};
use crate::native::great_circle_km;
use crate::state::{field, is_eligible, num, text, StateData};
use crate::verdict::{Action, Dispatch, Reject, Wait};

fn with_state<T>(f: impl FnOnce(&StateData) -> T) -> Option<T> {
    let state = context::with(|c| c.state.clone())?;
    Some(f(&state))
}

fn gpu_field(gpu_id: &str, key: &str) -> Dynamic {
    with_state(|s| s.gpu_index.get(gpu_id).map(|g| field(g, key)))
        .flatten()
        .unwrap_or(Dynamic::UNIT)
}

fn gpu_vram_free(gpu_id: &str) -> Dynamic {
    let free = gpu_field(gpu_id, "vram_free");
    if !free.is_unit() {
        return free;
    }
    // Derive what the state left out: free = total - allocated.
    match (num(&gpu_field(gpu_id, "vram_total")), num(&gpu_field(gpu_id, "vram_allocated"))) {
        (Some(t), Some(a)) => Dynamic::from_int((t - a).max(0.0) as INT),
        _ => Dynamic::UNIT,
    }
}

fn gpus_of(worker: Dynamic) -> Array {
    let pool = text(&field(&worker, "pool"));
    let ids = field(&worker, "gpu_ids");
    let Some(ids) = ids.read_lock::<Array>() else { return Array::new() };
    with_state(|s| {
        ids.iter()
            .filter_map(|id| {
                let key = match (text(id), id.as_int().ok(), &pool) {
                    (Some(t), ..) => t.to_string(),
                    (None, Some(i), Some(p)) => format!("{p}/{i}"),
                    _ => return None,
                };
                s.gpu_index.get(&key).cloned()
            })
            .collect()
    })
    .unwrap_or_default()
}

fn tenant(id: &str) -> Option<Dynamic> {
    with_state(|s| s.tenant_index.get(id).cloned()).flatten()
}

/// `(used, limit)` for each quota kind whose limit is set.
fn quota_pairs(t: &Dynamic) -> Vec<(FLOAT, FLOAT)> {
    let quota = field(t, "quota");
    let usage = field(t, "usage");
    [
        ("tokens_per_day", "tokens_today"),
        ("max_concurrent", "concurrent"),
        ("requests_per_minute", "requests_last_minute"),
        ("vram_bytes", "vram_bytes"),
    ]
    .iter()
    .filter_map(|(q, u)| {
        let limit = num(&field(&quota, q))?;
        Some((num(&field(&usage, u)).unwrap_or(0.0), limit))
    })
    .collect()
}

fn tenant_over_quota(id: &str) -> bool {
    let Some(t) = tenant(id) else { return false };
    if let Ok(b) = field(&t, "over_quota").as_bool() {
        return b;
    }
    quota_pairs(&t).iter().any(|(used, limit)| used >= limit)
}

fn tenant_remaining_quota(id: &str) -> Dynamic {
    let Some(t) = tenant(id) else { return Dynamic::UNIT };
    // Numbers may come as floats (`1e6` in JSON): read both kinds.
    let Some(limit) = num(&field(&field(&t, "quota"), "tokens_per_day")) else {
        return Dynamic::UNIT;
    };
    let used = num(&field(&field(&t, "usage"), "tokens_today")).unwrap_or(0.0);
    Dynamic::from_int((limit - used).max(0.0) as INT)
}

fn model_field(reference: &str, key: &str) -> Dynamic {
    with_state(|s| s.model(reference).map(|m| field(m, key))).flatten().unwrap_or(Dynamic::UNIT)
}

/// VRAM a model needs: `vram_required`, or its file size plus 20% for the KV
/// cache and activations when only the size is known.
pub fn vram_required(reference: &str) -> Option<INT> {
    if let Some(v) = num(&model_field(reference, "vram_required")) {
        return Some(v as INT);
    }
    num(&model_field(reference, "size_bytes")).map(|s| s as INT).map(|s| s + s / 5)
}

fn opt(v: Option<INT>) -> Dynamic {
    v.map_or(Dynamic::UNIT, Dynamic::from_int)
}

/// Workers that may be evicted: known to the state, not `down`, and with no
/// active job (a worker with an active job is never chosen).
fn idle_workers() -> Vec<Dynamic> {
    with_state(|s| {
        s.workers
            .iter()
            .map(|(_, w)| w.clone())
            .filter(|w| {
                field(w, "active").as_int().unwrap_or(0) == 0 && is_eligible(&field(w, "status"))
            })
            .collect()
    })
    .unwrap_or_default()
}

fn evict_action(w: &Dynamic, reason: &str) -> Dynamic {
    let mut fields = Map::new();
    fields.insert("worker_id".into(), field(w, "id"));
    fields.insert("pool".into(), field(w, "pool"));
    fields.insert("reason".into(), reason.into());
    Dynamic::from(Action { kind: "evict", fields })
}

fn oldest_first(a: &Dynamic, b: &Dynamic) -> std::cmp::Ordering {
    let used = |w: &Dynamic| num(&field(w, "last_used_at")).unwrap_or(0.0);
    used(a)
        .total_cmp(&used(b))
        .then_with(|| field(a, "id").to_string().cmp(&field(b, "id").to_string()))
}

fn evict_least_recently_used() -> Dynamic {
    let mut idle = idle_workers();
    idle.sort_by(oldest_first);
    idle.first().map_or(Dynamic::UNIT, |w| evict_action(w, "least_recently_used"))
}

/// The idle worker with the lowest `priority` field (missing counts as 0),
/// the least recently used among equals.
fn evict_lowest_priority() -> Dynamic {
    let mut idle = idle_workers();
    let prio = |w: &Dynamic| num(&field(w, "priority")).unwrap_or(0.0);
    idle.sort_by(|a, b| prio(a).total_cmp(&prio(b)).then_with(|| oldest_first(a, b)));
    idle.first().map_or(Dynamic::UNIT, |w| evict_action(w, "lowest_priority"))
}

fn evict_idle_workers() -> Dynamic {
    let idle = idle_workers();
    if idle.is_empty() {
        return Dynamic::UNIT;
    }
    Dynamic::from_array(idle.iter().map(|w| evict_action(w, "idle")).collect())
}

/// A worker map or a worker id, resolved against the state.
fn resolve_worker(w: &Dynamic) -> Option<Dynamic> {
    if let Some(id) = text(w) {
        return with_state(|s| s.worker(&id).cloned()).flatten();
    }
    text(&field(w, "id")).map(|_| w.clone())
}

fn evict(worker: Dynamic) -> Dynamic {
    match resolve_worker(&worker) {
        Some(w) if field(&w, "active").as_int().unwrap_or(0) == 0 => evict_action(&w, "requested"),
        _ => Dynamic::UNIT,
    }
}

fn start_worker(model: &str, pool: &str, gpu: Dynamic) -> Dynamic {
    let mut fields = Map::new();
    fields.insert("model".into(), model.into());
    fields.insert("pool".into(), pool.into());
    fields.insert("gpu".into(), gpu);
    Dynamic::from(Action { kind: "start_worker", fields })
}

fn dispatch(worker: Dynamic) -> HelperResult<Dispatch> {
    let id = text(&worker).or_else(|| text(&field(&worker, "id")));
    id.map(|worker_id| Dispatch { worker_id }).ok_or_else(|| {
        runtime(format!("dispatch() needs a worker or a worker id, got {}", worker.type_name()))
    })
}

fn reject(code: ImmutableString, status: Option<INT>) -> HelperResult<Reject> {
    Reject::new(code, status).map_err(runtime)
}

fn wait(reason: ImmutableString, ms: Option<INT>) -> HelperResult<Wait> {
    match ms {
        Some(ms) if ms < 0 => {
            Err(runtime(format!("wait(\"{reason}\", {ms}): ms must not be negative")))
        }
        _ => Ok(Wait { reason, ms }),
    }
}

fn coord(v: &Dynamic, name: &str) -> HelperResult<FLOAT> {
    num(v).ok_or_else(|| {
        runtime(format!("distance(): {name} must be a number, got {}", v.type_name()))
    })
}

fn distance(a: Dynamic, b: Dynamic, c: Dynamic, d: Dynamic) -> HelperResult<FLOAT> {
    Ok(great_circle_km(
        coord(&a, "lat1")?,
        coord(&b, "lon1")?,
        coord(&c, "lat2")?,
        coord(&d, "lon2")?,
    ))
}

fn queue_depth() -> INT {
    context::with(|c| {
        let job = c.job_id.clone();
        c.state.queue.iter().filter(|q| text(&field(q, "id")).is_none_or(|id| id != job)).count()
            as INT
    })
    .unwrap_or(0)
}

/// Registers a helper whose answer depends on the decision's context, so the
/// optimiser must never fold it into a constant.
macro_rules! volatile {
    ($engine:expr, $name:expr, $f:expr) => {
        FuncRegistration::new($name).with_volatility(true).register_into_engine($engine, $f);
    };
}

pub fn register(engine: &mut Engine) {
    let e = engine;
    volatile!(e, "gpu_vram_total", |id: &str| gpu_field(id, "vram_total"));
    volatile!(e, "gpu_vram_free", gpu_vram_free);
    volatile!(e, "gpu_vram_allocated", |id: &str| gpu_field(id, "vram_allocated"));
    volatile!(e, "gpu_device_name", |id: &str| gpu_field(id, "name"));
    volatile!(e, "gpu_utilization", |id: &str| gpu_field(id, "utilization"));
    volatile!(e, "gpu_temperature", |id: &str| gpu_field(id, "temperature"));
    volatile!(e, "gpus_of", gpus_of);
    volatile!(e, "tenant_over_quota", tenant_over_quota);
    volatile!(e, "tenant_remaining_quota", tenant_remaining_quota);
    volatile!(e, "tenant_usage", |id: &str| {
        tenant(id).map_or(Dynamic::UNIT, |t| field(&t, "usage"))
    });
    volatile!(e, "tenant_concurrent_jobs", |id: &str| {
        tenant(id).map_or(Dynamic::UNIT, |t| {
            Dynamic::from_int(num(&field(&field(&t, "usage"), "concurrent")).unwrap_or(0.0) as INT)
        })
    });
    volatile!(e, "tenant_weight", |id: &str| {
        tenant(id).map_or(Dynamic::UNIT, |t| {
            let w = field(&t, "weight");
            if w.is_unit() {
                Dynamic::from_int(1)
            } else {
                w
            }
        })
    });
    volatile!(e, "model_exists", |r: &str| with_state(|s| s.model(r).is_some()).unwrap_or(false));
    volatile!(e, "model_size_bytes", |r: &str| model_field(r, "size_bytes"));
    volatile!(e, "model_vram_required", |r: &str| opt(vram_required(r)));
    volatile!(e, "model_context_length", |r: &str| model_field(r, "context_length"));
    // A missing id (`job.tenant_id` of a job without a tenant reads as `()`)
    // is an unknown id: `false` or `()`, not "function not found".
    e.register_fn("tenant_over_quota", |_: ()| false).register_fn("model_exists", |_: ()| false);
    for name in [
        "gpu_vram_total",
        "gpu_vram_free",
        "gpu_vram_allocated",
        "gpu_device_name",
        "gpu_utilization",
        "gpu_temperature",
        "tenant_remaining_quota",
        "tenant_usage",
        "tenant_concurrent_jobs",
        "tenant_weight",
        "model_size_bytes",
        "model_vram_required",
        "model_context_length",
    ] {
        e.register_fn(name, |_: ()| ());
    }
    volatile!(e, "evict_least_recently_used", evict_least_recently_used);
    volatile!(e, "evict_lowest_priority", evict_lowest_priority);
    volatile!(e, "evict_idle_workers", evict_idle_workers);
    volatile!(e, "evict", evict);
    volatile!(e, "now", || context::with(|c| c.now_ms).unwrap_or(0));
    volatile!(e, "queue_depth", queue_depth);
    volatile!(e, "log", |message: Dynamic| context::log(&message.to_string()));
    e.register_fn("start_worker", |m: &str, p: &str| start_worker(m, p, Dynamic::UNIT))
        .register_fn("start_worker", |m: &str, p: &str, g: Dynamic| start_worker(m, p, g))
        .register_fn("dispatch", dispatch)
        .register_fn("reject", |code: ImmutableString| reject(code, None))
        .register_fn("reject", |code: ImmutableString, s: INT| reject(code, Some(s)))
        .register_fn("wait", |reason: ImmutableString| wait(reason, None))
        .register_fn("wait", |reason: ImmutableString, ms: INT| wait(reason, Some(ms)))
        .register_fn("distance", distance)
        .register_fn("hash", |s: &str| stable_hash(s.as_bytes()) as INT);
}
