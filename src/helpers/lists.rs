//! Helpers that are methods on arrays of workers: selections, filters and
//! aggregates. Each reads worker maps in place (they are shared, read-only
//! values) and clones only the handles it returns.

use std::cmp::Ordering;

use rhai::{Array, Dynamic, Engine, FnPtr, ImmutableString, Map, NativeCallContext, FLOAT, INT};

use super::{runtime, terminated, HelperResult};
use crate::context::{self, stable_hash};
use crate::native::{NativeFn, Val};
use crate::record::{self, with_fields, Fields, Rec};
use crate::state::{field, num, text};

/// Reads `key` of a worker map; `()` for anything that is not a map.
fn get(w: &Dynamic, key: &str) -> Dynamic {
    field(w, key)
}

fn id_of(w: &Dynamic) -> Option<ImmutableString> {
    match w.read_lock::<Rec>() {
        Some(r) => r.slot(record::ID).and_then(text),
        None => text(&get(w, "id")),
    }
}

/// Orders two elements that tie on every stated key: smallest `id` first,
/// then the earlier position (for elements without ids).
fn tie(a: &Dynamic, b: &Dynamic) -> Ordering {
    match (id_of(a), id_of(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => Ordering::Equal,
    }
}

/// The element with the smallest key, ties broken by `tie`. Each element's
/// key is read once.
fn best_by<K>(
    arr: &Array,
    key: impl Fn(&Dynamic) -> K,
    cmp: impl Fn(&K, &K) -> Ordering,
) -> Dynamic {
    let mut best: Option<(&Dynamic, K)> = None;
    for w in arr {
        let k = key(w);
        let better = match &best {
            None => true,
            Some((b, bk)) => cmp(&k, bk).then_with(|| tie(w, b)).is_lt(),
        };
        if better {
            best = Some((w, k));
        }
    }
    best.map_or(Dynamic::UNIT, |(w, _)| w.clone())
}

/// A numeric hot field of a record (or the same field of a map).
fn num_at(w: &Dynamic, slot: usize) -> Option<FLOAT> {
    match w.read_lock::<Rec>() {
        Some(r) => r.slot(slot).and_then(num),
        None => num(&get(w, record::HOT[slot])),
    }
}

/// `(load, vram_free)`: a missing load sorts last, a missing vram_free as 0.
fn load_key(w: &Dynamic) -> (FLOAT, FLOAT) {
    (
        num_at(w, record::LOAD).unwrap_or(FLOAT::INFINITY),
        num_at(w, record::VRAM_FREE).unwrap_or(-1.0),
    )
}

fn by_load(a: &(FLOAT, FLOAT), b: &(FLOAT, FLOAT)) -> Ordering {
    a.0.total_cmp(&b.0)
}

fn by_vram_desc(a: &(FLOAT, FLOAT), b: &(FLOAT, FLOAT)) -> Ordering {
    b.1.total_cmp(&a.1)
}

pub fn least_loaded(arr: &mut Array) -> Dynamic {
    best_by(arr, load_key, |a, b| by_load(a, b).then_with(|| by_vram_desc(a, b)))
}

fn most_vram_free(arr: &mut Array) -> Dynamic {
    best_by(arr, load_key, |a, b| by_vram_desc(a, b).then_with(|| by_load(a, b)))
}

/// Positions of `arr` sorted by id, so rotation and random picks do not
/// depend on how the script ordered the array.
fn id_order(arr: &Array) -> Vec<usize> {
    let mut order: Vec<usize> = (0..arr.len()).collect();
    order.sort_by(|&i, &j| tie(&arr[i], &arr[j]));
    order
}

fn round_robin(arr: &mut Array) -> Dynamic {
    if arr.is_empty() {
        return Dynamic::UNIT;
    }
    let order = id_order(arr);
    let mut key = Vec::new();
    for &i in &order {
        key.extend_from_slice(id_of(&arr[i]).unwrap_or_default().as_bytes());
        key.push(0);
    }
    let set = stable_hash(&key);
    let turn = context::with(|c| {
        let mut counters = c.rotation.lock().unwrap();
        let n = counters.entry(set).or_insert(0);
        let turn = *n;
        *n = n.wrapping_add(1);
        turn
    })
    .unwrap_or(0);
    arr[order[(turn % order.len() as u64) as usize]].clone()
}

fn random(arr: &mut Array) -> Dynamic {
    if arr.is_empty() {
        return Dynamic::UNIT;
    }
    let order = id_order(arr);
    arr[order[(context::next_random() % arr.len() as u64) as usize]].clone()
}

fn power_of_two_choices(arr: &mut Array) -> Dynamic {
    if arr.len() < 2 {
        return arr.first().cloned().unwrap_or(Dynamic::UNIT);
    }
    let order = id_order(arr);
    let n = arr.len() as u64;
    let i = (context::next_random() % n) as usize;
    let mut j = (context::next_random() % (n - 1)) as usize;
    if j >= i {
        j += 1;
    }
    let (a, b) = (&arr[order[i]], &arr[order[j]]);
    let (ka, kb) = (load_key(a), load_key(b));
    match by_load(&ka, &kb).then_with(|| by_vram_desc(&ka, &kb)).then_with(|| tie(a, b)) {
        Ordering::Greater => b.clone(),
        _ => a.clone(),
    }
}

fn sticky(arr: &mut Array, key: Dynamic) -> Dynamic {
    let key = key.to_string();
    let mut best: Option<(u64, &Dynamic)> = None;
    for w in arr.iter() {
        let mut bytes = key.as_bytes().to_vec();
        bytes.push(0);
        bytes.extend_from_slice(id_of(w).unwrap_or_default().as_bytes());
        let score = stable_hash(&bytes);
        if best.is_none_or(|(s, b)| score > s || (score == s && tie(w, b).is_lt())) {
            best = Some((score, w));
        }
    }
    best.map_or(Dynamic::UNIT, |(_, w)| w.clone())
}

/// Calls a key or predicate function on each element: natively when the
/// policy's closure was compiled (see `native.rs`), through Rhai otherwise.
struct Caller<'a> {
    ctx: &'a NativeCallContext<'a>,
    f: &'a FnPtr,
    native: Option<NativeFn>,
    with_index: bool,
    native_calls: u64,
}

impl<'a> Caller<'a> {
    fn new(ctx: &'a NativeCallContext<'a>, f: &'a FnPtr) -> Self {
        let (native, arity) = context::with(|c| {
            (c.natives.fns.get(f.fn_name()).cloned(), c.natives.arity.get(f.fn_name()).copied())
        })
        .unwrap_or((None, None));
        let with_index = arity.is_some_and(|n| n == f.curry().len() + 2);
        // A compiled closure takes the item as its last parameter; one that
        // also takes the index (`|w, i|`) must run through Rhai.
        let native = if with_index { None } else { native.map(|n| n.bind(f.curry())) };
        Caller { ctx, f, native, with_index, native_calls: 0 }
    }

    /// The compiled closure's answer, when it has one (`native.rs`).
    fn native(&mut self, item: &Dynamic) -> HelperResult<Option<Val>> {
        let Some(v) = self.native.as_ref().and_then(|n| n.eval(item, self.f.curry())) else {
            return Ok(None);
        };
        self.native_calls += 1;
        if self.native_calls.is_multiple_of(4096) {
            context::charge(4096).map_err(terminated)?;
        }
        Ok(Some(v))
    }

    /// The closure, run by Rhai.
    fn script(&self, item: &Dynamic, index: usize) -> HelperResult<Dynamic> {
        if self.with_index {
            self.f.call_raw(self.ctx, None, [item.clone(), Dynamic::from_int(index as INT)])
        } else {
            self.f.call_raw(self.ctx, None, [item.clone()])
        }
    }

    fn call(&mut self, item: &Dynamic, index: usize) -> HelperResult<Dynamic> {
        match self.native(item)? {
            Some(v) => Ok(v.into_dynamic()),
            None => self.script(item, index),
        }
    }

    /// `call` for a predicate, without making a `Dynamic` of a native answer:
    /// true only for `true`.
    fn test(&mut self, item: &Dynamic, index: usize) -> HelperResult<bool> {
        match self.native(item)? {
            Some(v) => Ok(matches!(v, Val::Bool(true))),
            None => Ok(self.script(item, index)?.as_bool().unwrap_or(false)),
        }
    }

    /// `call` for a sort key, without making a `Dynamic` of a native answer.
    fn key(&mut self, item: &Dynamic, index: usize) -> HelperResult<Option<Key>> {
        match self.native(item)? {
            Some(v) => Ok(Key::of_native(v)),
            None => Ok(Key::of(&self.script(item, index)?)),
        }
    }

    fn finish(self) -> HelperResult<()> {
        context::charge(self.native_calls % 4096).map_err(terminated)
    }
}

fn filter(ctx: NativeCallContext, arr: &mut Array, f: FnPtr) -> HelperResult<Array> {
    let mut caller = Caller::new(&ctx, &f);
    let mut out = Array::new();
    for (i, w) in arr.iter().enumerate() {
        if caller.test(w, i)? {
            out.push(w.clone());
        }
    }
    caller.finish()?;
    Ok(out)
}

/// A sort key of `min_by`/`max_by`: numbers by value, then strings. Other
/// values (`()`, bools, maps) are not comparable and their elements are
/// skipped.
enum Key {
    Num(FLOAT),
    Text(ImmutableString),
}

impl Key {
    fn of(v: &Dynamic) -> Option<Key> {
        match num(v) {
            Some(n) => Some(Key::Num(n)),
            None => text(v).map(Key::Text),
        }
    }

    fn of_native(v: Val) -> Option<Key> {
        match v {
            Val::Int(i) => Some(Key::Num(i as FLOAT)),
            Val::Float(f) => Some(Key::Num(f)),
            Val::Str(s) => Some(Key::Text(s)),
            Val::Unit | Val::Bool(_) => None,
        }
    }

    fn cmp(&self, other: &Key) -> Ordering {
        match (self, other) {
            (Key::Num(a), Key::Num(b)) => a.total_cmp(b),
            (Key::Num(_), Key::Text(_)) => Ordering::Less,
            (Key::Text(_), Key::Num(_)) => Ordering::Greater,
            (Key::Text(a), Key::Text(b)) => a.as_str().cmp(b.as_str()),
        }
    }
}

fn extreme_by(
    ctx: NativeCallContext,
    arr: &mut Array,
    f: FnPtr,
    max: bool,
) -> HelperResult<Dynamic> {
    let mut caller = Caller::new(&ctx, &f);
    let mut best: Option<(Key, &Dynamic)> = None;
    for (i, w) in arr.iter().enumerate() {
        let Some(k) = caller.key(w, i)? else { continue };
        let better = match &best {
            None => true,
            Some((bk, bw)) => {
                let mut o = k.cmp(bk);
                if max {
                    o = o.reverse();
                }
                o.then_with(|| tie(w, bw)).is_lt()
            }
        };
        if better {
            best = Some((k, w));
        }
    }
    caller.finish()?;
    Ok(best.map_or(Dynamic::UNIT, |(_, w)| w.clone()))
}

fn weighted_random(ctx: NativeCallContext, arr: &mut Array, f: FnPtr) -> HelperResult<Dynamic> {
    if arr.is_empty() {
        return Ok(Dynamic::UNIT);
    }
    let order = id_order(arr);
    let mut caller = Caller::new(&ctx, &f);
    let mut weights = Vec::with_capacity(arr.len());
    for &i in &order {
        let w = num(&caller.call(&arr[i], i)?).filter(|w| w.is_finite() && *w > 0.0);
        weights.push(w.unwrap_or(0.0));
    }
    caller.finish()?;
    let total: FLOAT = weights.iter().sum();
    let draw = context::next_random();
    if total <= 0.0 {
        // No positive weight: every worker is as good as another.
        return Ok(arr[order[(draw % arr.len() as u64) as usize]].clone());
    }
    let mut target = (draw >> 11) as FLOAT / (1u64 << 53) as FLOAT * total;
    for (pos, w) in weights.iter().enumerate() {
        if target < *w {
            return Ok(arr[order[pos]].clone());
        }
        target -= w;
    }
    let last = weights.iter().rposition(|w| *w > 0.0).unwrap_or(0);
    Ok(arr[order[last]].clone())
}

fn sum_keys(ctx: NativeCallContext, arr: &mut Array, f: FnPtr) -> HelperResult<(Dynamic, usize)> {
    let mut caller = Caller::new(&ctx, &f);
    let (mut int_sum, mut float_sum, mut floats, mut n) = (0 as INT, 0.0 as FLOAT, false, 0);
    for (i, w) in arr.iter().enumerate() {
        let k = caller.call(w, i)?;
        if let Ok(v) = k.as_int() {
            int_sum =
                int_sum.checked_add(v).ok_or_else(|| runtime("sum_by: integer overflow".into()))?;
        } else if let Ok(v) = k.as_float() {
            float_sum += v;
            floats = true;
        } else {
            continue;
        }
        n += 1;
    }
    caller.finish()?;
    let total = if floats {
        Dynamic::from_float(float_sum + int_sum as FLOAT)
    } else {
        Dynamic::from_int(int_sum)
    };
    Ok((total, n))
}

fn count(ctx: NativeCallContext, arr: &mut Array, f: FnPtr) -> HelperResult<INT> {
    let mut caller = Caller::new(&ctx, &f);
    let mut n = 0;
    for (i, w) in arr.iter().enumerate() {
        if caller.test(w, i)? {
            n += 1;
        }
    }
    caller.finish()?;
    Ok(n)
}

fn keep(arr: &Array, pred: impl Fn(Fields<'_>) -> bool) -> Array {
    arr.iter().filter(|w| with_fields(w, &pred).unwrap_or(false)).cloned().collect()
}

fn str_field_is(m: Fields<'_>, key: &str, want: &str) -> bool {
    match m.get(key) {
        Some(v) => match v.read_lock::<ImmutableString>() {
            Some(s) => s.as_str() == want,
            None => v
                .read_lock::<Array>()
                .is_some_and(|a| a.iter().any(|x| text(x).as_deref() == Some(want))),
        },
        None => false,
    }
}

fn int_field(m: Fields<'_>, key: &str) -> Option<INT> {
    m.get(key).and_then(|v| v.as_int().ok())
}

fn serves(m: Fields<'_>, names: &[ImmutableString]) -> bool {
    let matches = |v: &Dynamic| text(v).is_some_and(|s| names.contains(&s));
    m.get("model").is_some_and(matches)
        || m.get("models")
            .and_then(|v| v.read_lock::<Array>().map(|a| a.iter().any(matches)))
            .unwrap_or(false)
}

fn model_names(reference: &str) -> Vec<ImmutableString> {
    context::with(|c| c.state.model_names(reference))
        .unwrap_or_else(|| vec![ImmutableString::from(reference)])
}

fn with_model(arr: &mut Array, reference: &str) -> Array {
    let names = model_names(reference);
    keep(arr, |m| serves(m, &names))
}

fn can_fit(arr: &mut Array, reference: &str) -> Array {
    let Some(need) = super::queries::vram_required(reference) else { return Array::new() };
    keep(arr, |m| m.get("vram_free").and_then(num).is_some_and(|free| free >= need as FLOAT))
}

fn in_region(arr: &mut Array, region: &str) -> Array {
    keep(arr, |m| {
        m.get("geo")
            .and_then(|g| {
                g.read_lock::<Map>().map(|g| str_field_is(Fields::Map(&g), "region", region))
            })
            .unwrap_or(false)
            || str_field_is(m, "region", region)
    })
}

fn by_id(arr: &mut Array, id: &str) -> Dynamic {
    arr.iter().find(|w| id_of(w).as_deref() == Some(id)).cloned().unwrap_or(Dynamic::UNIT)
}

pub fn register(engine: &mut Engine) {
    engine
        .register_fn("least_loaded", least_loaded)
        .register_fn("most_vram_free", most_vram_free)
        .register_fn("round_robin", round_robin)
        .register_fn("random", random)
        .register_fn("power_of_two_choices", power_of_two_choices)
        .register_fn("first", |a: &mut Array| a.first().cloned().unwrap_or(Dynamic::UNIT))
        .register_fn("last", |a: &mut Array| a.last().cloned().unwrap_or(Dynamic::UNIT))
        .register_fn("sticky", sticky)
        .register_fn("filter", filter)
        .register_fn("min_by", |c: NativeCallContext, a: &mut Array, f: FnPtr| {
            extreme_by(c, a, f, false)
        })
        .register_fn("max_by", |c: NativeCallContext, a: &mut Array, f: FnPtr| {
            extreme_by(c, a, f, true)
        })
        .register_fn("weighted_random", weighted_random)
        .register_fn("sum_by", |c: NativeCallContext, a: &mut Array, f: FnPtr| {
            sum_keys(c, a, f).map(|(s, _)| s)
        })
        .register_fn("avg_by", |c: NativeCallContext, a: &mut Array, f: FnPtr| {
            sum_keys(c, a, f).map(|(s, n)| match n {
                0 => Dynamic::UNIT,
                n => Dynamic::from_float(num(&s).unwrap_or(0.0) / n as FLOAT),
            })
        })
        .register_fn("count", count)
        .register_fn("by_id", by_id)
        .register_fn("with_model", with_model)
        // A job without a model (`job.model` is `()`) matches no worker.
        .register_fn("with_model", |_: &mut Array, _: ()| Array::new())
        .register_fn("can_fit", |_: &mut Array, _: ()| Array::new())
        .register_fn("with_capability", |a: &mut Array, c: &str| {
            keep(a, |m| str_field_is(m, "capability", c))
        })
        .register_fn("with_backend", |a: &mut Array, b: &str| {
            keep(a, |m| str_field_is(m, "backend", b))
        })
        .register_fn("in_region", in_region)
        .register_fn("idle", |a: &mut Array| keep(a, |m| int_field(m, "active") == Some(0)))
        .register_fn("available", |a: &mut Array| {
            keep(a, |m| {
                str_field_is(m, "status", "ready")
                    && int_field(m, "active").unwrap_or(0) < int_field(m, "slots").unwrap_or(1)
            })
        })
        .register_fn("can_fit", can_fit);
}
