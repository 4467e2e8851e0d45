//! Conversion between Python values and Rhai values (DESIGN 4.1).
//!
//! `()` <-> None, bool, INT <-> int, FLOAT <-> float, string and char -> str,
//! array <-> list (tuples accepted), map <-> dict with str keys. Anything else
//! is refused with the path of the offending value, e.g. `state.workers[3].geo`.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use rhai::{Array, Dynamic, ImmutableString, Map};

use crate::record::Rec;
use crate::verdict::{Action, Dispatch, Reject, Wait};

/// Nesting deeper than this is refused: it is never real state, and a cycle
/// (a dict that contains itself) would otherwise recurse without end.
const MAX_DEPTH: usize = 64;

#[derive(Debug)]
pub struct ConvertError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn fail(path: &str, message: String) -> ConvertError {
    ConvertError { path: path.to_string(), message }
}

fn to_dynamic_at(
    obj: &Bound<'_, PyAny>,
    path: &mut String,
    depth: usize,
) -> Result<Dynamic, ConvertError> {
    if obj.is_none() {
        return Ok(Dynamic::UNIT);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        let text =
            s.to_str().map_err(|e| fail(path, format!("string is not valid UTF-8 ({e})")))?;
        return Ok(Dynamic::from(ImmutableString::from(text)));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Dynamic::from_bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        return obj
            .extract::<i64>()
            .map(Dynamic::from_int)
            .map_err(|_| fail(path, format!("integer {obj} does not fit in 64 bits")));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Ok(Dynamic::from_float(f.value()));
    }
    if depth >= MAX_DEPTH {
        return Err(fail(path, format!("nested deeper than {MAX_DEPTH} levels")));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        return dict_to_map(d, path, depth).map(Dynamic::from_map);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return seq_to_array(l.iter(), path, depth).map(Dynamic::from_array);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return seq_to_array(t.iter(), path, depth).map(Dynamic::from_array);
    }
    let type_name = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    Err(fail(
        path,
        format!(
            "cannot convert a value of type '{type_name}' \
             (expected None, bool, int, float, str, list or dict)"
        ),
    ))
}

pub fn dict_to_map(
    d: &Bound<'_, PyDict>,
    path: &mut String,
    depth: usize,
) -> Result<Map, ConvertError> {
    let mut map = Map::new();
    for (k, v) in d.iter() {
        let key = k
            .cast::<PyString>()
            .map_err(|_| fail(path, format!("dictionary key {k} is not a string")))?;
        let key = key.to_str().map_err(|e| fail(path, format!("key is not valid UTF-8 ({e})")))?;
        let mark = path.len();
        path.push('.');
        path.push_str(key);
        let value = to_dynamic_at(&v, path, depth + 1)?;
        path.truncate(mark);
        map.insert(key.into(), value);
    }
    Ok(map)
}

fn seq_to_array<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    path: &mut String,
    depth: usize,
) -> Result<Array, ConvertError> {
    let mut out = Array::new();
    for (i, item) in items.enumerate() {
        let mark = path.len();
        path.push_str(&format!("[{i}]"));
        out.push(to_dynamic_at(&item, path, depth + 1)?);
        path.truncate(mark);
    }
    Ok(out)
}

/// Converts a Rhai value to Python. Shared values are read through; the
/// decision types become dicts so callers can serialise them as JSON.
pub fn to_py<'py>(py: Python<'py>, value: &Dynamic) -> PyResult<Bound<'py, PyAny>> {
    if value.is_shared() {
        return to_py(py, &value.flatten_clone());
    }
    if value.is_unit() {
        return Ok(py.None().into_bound(py));
    }
    if let Ok(b) = value.as_bool() {
        return Ok(PyBool::new(py, b).to_owned().into_any());
    }
    if let Ok(i) = value.as_int() {
        return Ok(i.into_pyobject(py)?.into_any());
    }
    if let Ok(f) = value.as_float() {
        return Ok(PyFloat::new(py, f).into_any());
    }
    if let Some(s) = value.read_lock::<ImmutableString>() {
        return Ok(PyString::new(py, s.as_str()).into_any());
    }
    if let Ok(c) = value.as_char() {
        return Ok(PyString::new(py, &c.to_string()).into_any());
    }
    if let Some(a) = value.read_lock::<Array>() {
        let list = PyList::empty(py);
        for item in a.iter() {
            list.append(to_py(py, item)?)?;
        }
        return Ok(list.into_any());
    }
    if let Some(m) = value.read_lock::<Map>() {
        return map_to_py(py, &m).map(|d| d.into_any());
    }
    if let Some(r) = value.read_lock::<Rec>() {
        return map_to_py(py, &r.to_map()).map(|d| d.into_any());
    }
    if let Some(a) = value.read_lock::<Action>() {
        return map_to_py(py, &a.to_map()).map(|d| d.into_any());
    }
    if let Some(r) = value.read_lock::<Reject>() {
        return map_to_py(py, &r.to_map()).map(|d| d.into_any());
    }
    if let Some(w) = value.read_lock::<Wait>() {
        return map_to_py(py, &w.to_map()).map(|d| d.into_any());
    }
    if let Some(d) = value.read_lock::<Dispatch>() {
        return map_to_py(py, &d.to_map()).map(|d| d.into_any());
    }
    // Function pointers, ranges, blobs: their Rhai display form.
    Ok(PyString::new(py, &value.to_string()).into_any())
}

pub fn map_to_py<'py>(py: Python<'py>, map: &Map) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (k, v) in map.iter() {
        dict.set_item(k.as_str(), to_py(py, v)?)?;
    }
    Ok(dict)
}
