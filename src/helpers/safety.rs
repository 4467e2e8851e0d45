//! Guards for native functions that could allocate past the memory limit in
//! one call, before the progress callback gets a chance to look.
//!
//! Rhai checks a string's size after the function that built it returns, so
//! `"x".pad(1000000, "x").replace("x", big)` would allocate the whole result
//! first; and printing an array that holds one large string 100,000 times
//! builds a string of that combined size. These overrides work out the size
//! first and refuse with `ErrorDataTooLarge` when it is over the string limit.

use std::fmt::Write;

use rhai::{
    Array, Dynamic, Engine, EvalAltResult, FuncRegistration, ImmutableString, Map,
    NativeCallContext, Position,
};

use super::HelperResult;
use crate::context::{self, Tripped};
use crate::record::Rec;

fn too_large(what: &str) -> Box<EvalAltResult> {
    EvalAltResult::ErrorDataTooLarge(what.into(), Position::NONE).into()
}

/// An upper bound on the length of `v` as displayed, or `None` once it
/// passes `budget` (the walk stops there, so the check itself stays cheap).
pub fn display_size(v: &Dynamic, budget: usize) -> Option<usize> {
    let size = if let Some(s) = v.read_lock::<ImmutableString>() {
        s.len() * 2 + 2
    } else if let Some(a) = v.read_lock::<Array>() {
        let mut total = 2;
        for x in a.iter() {
            total += display_size(x, budget.checked_sub(total)?)? + 2;
            if total > budget {
                return None;
            }
        }
        total
    } else if let Some(r) = v.read_lock::<Rec>() {
        return display_size(&Dynamic::from_map(r.to_map()), budget);
    } else if let Some(m) = v.read_lock::<Map>() {
        let mut total = 3;
        for (k, x) in m.iter() {
            total += k.len() * 2 + 6 + display_size(x, budget.checked_sub(total)?)?;
            if total > budget {
                return None;
            }
        }
        total
    } else {
        32
    };
    (size <= budget).then_some(size)
}

/// Displays a value for a log line or a hash key, refusing absurd sizes.
pub fn display(v: &Dynamic, budget: usize) -> HelperResult<String> {
    display_size(v, budget).ok_or_else(|| too_large("Length of string"))?;
    Ok(v.to_string())
}

fn check(ctx: &NativeCallContext, v: &Dynamic) -> HelperResult<()> {
    let max = ctx.engine().max_string_size();
    match display_size(v, if max == 0 { usize::MAX } else { max }) {
        Some(_) => Ok(()),
        None => Err(too_large("Length of string")),
    }
}

fn debug_of(ctx: &NativeCallContext, v: &Dynamic) -> HelperResult<ImmutableString> {
    let out = ctx.call_native_fn::<ImmutableString>("to_debug", (v.clone(),))?;
    Ok(out)
}

/// What `to_string`/`to_debug` do with a value too large to display.
///
/// They must not fail: Rhai calls them for string interpolation and for
/// `string + value` through a path that swallows the error and then formats
/// the whole value itself, with no limit: gigabytes, or an abort when the
/// allocation fails. So they answer an empty string and stop the decision at
/// its next operation with `DataTooLarge`. Rhai also checks the argument
/// again after the call, and that check fails (sending it to the same
/// unbounded formatting) when the value is itself over Rhai's data limits, as
/// an array grown by `a[i] = s` can be; such a value is emptied first (the
/// decision is over anyway). The state's shared arrays, which hold only
/// records, are never emptied. `print` and `debug` are only called directly
/// and fail as usual.
fn over_limit(
    ctx: &NativeCallContext,
    value: Dynamic,
    clear: impl FnOnce(),
    err: Box<EvalAltResult>,
) -> HelperResult<ImmutableString> {
    match ctx.fn_name() {
        "to_string" | "to_debug" => {
            if ctx.engine().ensure_data_size_within_limits(&value).is_err() {
                clear();
            }
            context::trip(Tripped::Data);
            Ok(ImmutableString::new())
        }
        _ => Err(err),
    }
}

fn format_array(ctx: NativeCallContext, arr: &mut Array) -> HelperResult<ImmutableString> {
    let value = Dynamic::from_array(arr.clone());
    if let Err(e) = check(&ctx, &value) {
        let state_array = arr.iter().all(|x| x.read_lock::<Rec>().is_some());
        return over_limit(
            &ctx,
            value,
            || {
                if !state_array {
                    arr.clear()
                }
            },
            e,
        );
    }
    let mut out = String::from("[");
    for (i, x) in arr.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&debug_of(&ctx, x)?);
    }
    out.push(']');
    Ok(out.into())
}

fn format_map(ctx: NativeCallContext, map: &mut Map) -> HelperResult<ImmutableString> {
    let value = Dynamic::from_map(map.clone());
    if let Err(e) = check(&ctx, &value) {
        return over_limit(&ctx, value, || map.clear(), e);
    }
    let mut out = String::from("#{");
    for (i, (k, x)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{:?}: {}", k.as_str(), debug_of(&ctx, x)?);
    }
    out.push('}');
    Ok(out.into())
}

fn json_into(out: &mut String, v: &Dynamic) {
    if v.is_shared() {
        return json_into(out, &v.flatten_clone());
    }
    if v.is_unit() {
        out.push_str("null");
    } else if let Ok(b) = v.as_bool() {
        out.push_str(if b { "true" } else { "false" });
    } else if let Ok(i) = v.as_int() {
        let _ = write!(out, "{i}");
    } else if let Ok(f) = v.as_float() {
        if f.is_finite() {
            let _ = write!(out, "{f:?}");
        } else {
            out.push_str("null");
        }
    } else if let Some(a) = v.read_lock::<Array>() {
        out.push('[');
        for (i, x) in a.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_into(out, x);
        }
        out.push(']');
    } else if let Some(r) = v.read_lock::<Rec>() {
        json_into(out, &Dynamic::from_map(r.to_map()));
    } else if let Some(m) = v.read_lock::<Map>() {
        out.push('{');
        for (i, (k, x)) in m.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_string(out, k);
            out.push(':');
            json_into(out, x);
        }
        out.push('}');
    } else {
        json_string(out, &v.to_string());
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn to_json(ctx: NativeCallContext, map: &mut Map) -> HelperResult<ImmutableString> {
    let value = Dynamic::from_map(map.clone());
    check(&ctx, &value)?;
    let mut out = String::new();
    json_into(&mut out, &value);
    Ok(out.into())
}

/// `string.replace(find, with)` after checking the result's size.
fn replace(
    ctx: NativeCallContext,
    s: &mut ImmutableString,
    find: &str,
    with: &str,
) -> HelperResult<()> {
    if s.is_empty() || find.is_empty() {
        return Ok(());
    }
    let grows = with.len().saturating_sub(find.len());
    if grows > 0 {
        let max = ctx.engine().max_string_size();
        let hits = s.matches(find).count();
        if max > 0 && s.len().saturating_add(hits.saturating_mul(grows)) > max {
            return Err(too_large("Length of string"));
        }
    }
    *s = s.replace(find, with).into();
    Ok(())
}

pub fn register(engine: &mut Engine) {
    for name in ["to_string", "to_debug", "print", "debug"] {
        engine.register_fn(name, format_array);
        engine.register_fn(name, format_map);
    }
    engine.register_fn("to_json", to_json);
    // `replace` changes its argument in place, so it must not be marked pure:
    // a pure function may be called on a constant.
    let mutating = || FuncRegistration::new("replace").with_purity(false);
    mutating().register_into_engine(engine, replace);
    mutating().register_into_engine(
        engine,
        |c: NativeCallContext, s: &mut ImmutableString, f: char, w: &str| {
            replace(c, s, &f.to_string(), w)
        },
    );
    mutating().register_into_engine(
        engine,
        |c: NativeCallContext, s: &mut ImmutableString, f: &str, w: char| {
            replace(c, s, f, &w.to_string())
        },
    );
}
