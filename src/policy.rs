//! Compiling a policy and running one decision in the sandbox.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use rhai::packages::{Package, StandardPackage};
use rhai::{
    Array, CallFnOptions, Dynamic, Engine, ImmutableString, Map, Position, Scope, AST, INT,
};

use crate::context::{self, stable_hash, Context, Rotation, Session};
use crate::convert::{dict_to_map, map_to_py, to_py};
use crate::errors::{build, classify, conversion_error, parse_message};
use crate::helpers;
use crate::limits::{Limits, LIMIT_KEYS};
use crate::native::NativeTable;
use crate::record::{self, is_record_or_map};
use crate::state::{field, freeze_array, is_eligible, num, text, State, StateData};
use crate::verdict::{self, Action, Dispatch, Reject, Wait};

/// Names that resolve to the state inside every script function.
///
/// A parameter or local of the same name wins: Rhai gives it an index
/// (`index > 0`), except for the captured variables of a closure, which are
/// only found by searching the function's scope (`in_scope`).
fn resolve_var(name: &str, index: usize, in_scope: impl FnOnce() -> bool) -> Option<Dynamic> {
    const GLOBALS: &[&str] =
        &["workers", "all_workers", "pools", "gpus", "models", "tenants", "queue"];
    if index > 0 || !GLOBALS.contains(&name) || in_scope() {
        return None;
    }
    context::with(|c| match name {
        "workers" => Some(c.workers.clone()),
        "all_workers" => Some(c.state.all_workers_dyn.clone()),
        "pools" => Some(c.state.pools_dyn.clone()),
        "gpus" => Some(c.state.gpus_dyn.clone()),
        "models" => Some(c.state.models_dyn.clone()),
        "tenants" => Some(c.state.tenants_dyn.clone()),
        "queue" => Some(c.state.queue_dyn.clone()),
        _ => None,
    })
    .flatten()
}

/// A Rhai engine with the sandbox of DESIGN 2.4 and every helper registered.
pub fn build_engine(limits: &Limits) -> Engine {
    build_engine_with(limits, false)
}

/// `locating`: also step through expressions with the debugger hook, noting
/// the last position. It costs a callback per expression, so only the engine
/// that re-runs a failed decision to find where a limit hit has it: Rhai moves
/// the position of a limit error to the outermost call, which for the entry
/// point is none at all.
pub fn build_engine_with(limits: &Limits, locating: bool) -> Engine {
    // `new_raw` has no module resolver, so nothing can be read from disk.
    let mut engine = Engine::new_raw();
    engine.register_global_module(StandardPackage::new().as_shared_module());
    engine
        .set_max_string_size(limits.max_string_bytes)
        .set_max_array_size(limits.max_array_items)
        .set_max_map_size(limits.max_map_entries)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_fn_expr_depth);
    engine.disable_symbol("eval");
    engine.on_print(context::log);
    engine.on_debug(|text, _, pos| match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => context::log(&format!("[{l}:{c}] {text}")),
        _ => context::log(text),
    });
    engine.on_progress(|_| context::progress());
    #[allow(deprecated)] // "volatile", not deprecated: the version is pinned
    if locating {
        engine.register_debugger(
            |_, debugger| debugger,
            |_, event, _, _, pos| {
                // Only steps: the exit events that follow an error would move the
                // position to the end of the function.
                if matches!(event, rhai::debugger::DebuggerEvent::Step) {
                    context::note_position(pos);
                }
                Ok(rhai::debugger::DebuggerCommand::StepInto)
            },
        );
    }
    #[allow(deprecated)]
    engine.on_var(|name, index, ctx| Ok(resolve_var(name, index, || ctx.scope().contains(name))));
    verdict::register(&mut engine);
    record::register(&mut engine);
    helpers::register_lists(&mut engine);
    helpers::register_queries(&mut engine);
    helpers::register_safety(&mut engine);
    engine
}

pub fn limits_from(py_limits: Option<&Bound<'_, PyDict>>) -> PyResult<Limits> {
    let mut limits = Limits::default();
    if let Some(d) = py_limits {
        for (k, v) in d.iter() {
            let key: String = k.extract()?;
            let value: i64 = v.extract().map_err(|_| {
                PyValueError::new_err(format!("limits.{key}: expected a positive integer, got {v}"))
            })?;
            if value <= 0 {
                return Err(PyValueError::new_err(format!(
                    "limits.{key}: expected a positive integer, got {value}"
                )));
            }
            limits.set(&key, value as u64).map_err(PyValueError::new_err)?;
        }
    }
    Ok(limits)
}

#[pyclass(module = "rbee._engine", frozen)]
pub struct CompiledPolicy {
    engine: Engine,
    /// The same sandbox with the position-noting hook, for failed decisions.
    locator: Engine,
    ast: AST,
    natives: Arc<NativeTable>,
    rotation: Rotation,
    limits: Limits,
    arity: usize,
    /// Where `schedule_job` starts. Rhai moves the position of a limit error
    /// to the outermost call, which for the entry point is no position at
    /// all; such errors are reported here, in the entry function.
    entry: rhai::Position,
}

pub enum Outcome {
    Dispatch(ImmutableString),
    Reject(Reject),
    Wait(ImmutableString, Option<INT>),
}

struct Decided {
    outcome: Outcome,
    actions: Vec<Map>,
}

/// Names a returned value for an error message, in script terms rather than
/// the Rust type names Rhai reports for custom types.
fn describe(v: &Dynamic) -> String {
    if let Some(r) = v.read_lock::<Reject>() {
        return format!("reject(\"{}\", {})", r.code, r.status);
    }
    if let Some(w) = v.read_lock::<Wait>() {
        return format!("wait(\"{}\")", w.reason);
    }
    if let Some(d) = v.read_lock::<Dispatch>() {
        return format!("dispatch(\"{}\")", d.worker_id);
    }
    if v.read_lock::<record::Rec>().is_some() {
        return match text(&field(v, "id")) {
            Some(id) => format!("the record of '{id}'"),
            None => "a record without an id".into(),
        };
    }
    let name = v.type_name();
    let name =
        if name.contains("::Range") { "range" } else { name.rsplit("::").next().unwrap_or(name) };
    let shown = helpers::display(v, 120).unwrap_or_else(|_| "…".into());
    format!("{name} ({shown})")
}

/// Interprets what `schedule_job` returned (DESIGN 2.1).
fn interpret(
    value: Dynamic,
    state: &StateData,
    failed: &[ImmutableString],
) -> Result<Decided, String> {
    let mut actions = Vec::new();
    let value = if value.is_shared() { value.flatten_clone() } else { value };
    if value.is_array() {
        let items = value.clone().cast::<Array>();
        if items.is_empty() {
            return Err("schedule_job returned an empty array; \
                expected actions, optionally ending with a worker"
                .into());
        }
        let mut flat = Vec::new();
        for item in items {
            match item.clone().try_cast::<Array>() {
                Some(inner) => flat.extend(inner),
                None => flat.push(item),
            }
        }
        let last = flat.len() - 1;
        for (i, item) in flat.into_iter().enumerate() {
            let action = item.read_lock::<Action>().map(|a| a.to_map());
            if let Some(a) = action {
                actions.push(a);
            } else if item.is_unit() {
                // `()` stands for "no action", as eviction helpers answer.
            } else if i == last {
                let outcome = single(item, state, failed)?;
                return Ok(Decided { outcome, actions });
            } else {
                return Err(format!(
                    "schedule_job returned an array whose element {i} is {}; \
                     only the last element may be something other than an action",
                    describe(&item)
                ));
            }
        }
        // Only `()`s (no eviction qualified, no worker fits): nothing pending.
        let reason = if actions.is_empty() { "no_worker" } else { "actions_pending" };
        return Ok(Decided { outcome: Outcome::Wait(reason.into(), None), actions });
    }
    if let Some(a) = value.read_lock::<Action>() {
        actions.push(a.to_map());
        return Ok(Decided { outcome: Outcome::Wait("actions_pending".into(), None), actions });
    }
    Ok(Decided { outcome: single(value, state, failed)?, actions })
}

fn single(
    value: Dynamic,
    state: &StateData,
    failed: &[ImmutableString],
) -> Result<Outcome, String> {
    if value.is_unit() {
        return Ok(Outcome::Wait("no_worker".into(), None));
    }
    if let Some(r) = value.read_lock::<Reject>() {
        return Ok(Outcome::Reject(r.clone()));
    }
    if let Some(w) = value.read_lock::<Wait>() {
        return Ok(Outcome::Wait(w.reason.clone(), w.ms));
    }
    let id = if let Some(d) = value.read_lock::<Dispatch>() {
        d.worker_id.clone()
    } else if let Some(s) = text(&value) {
        s
    } else if is_record_or_map(&value) {
        text(&field(&value, "id")).ok_or_else(|| {
            format!("schedule_job returned a map that is not a worker: {}", describe(&value))
        })?
    } else {
        return Err(format!(
            "schedule_job returned {}; \
             expected a worker, a worker id, (), reject(..), wait(..) or actions",
            describe(&value)
        ));
    };
    match state.worker(&id) {
        Some(w) if is_eligible(&field(w, "status")) && !failed.contains(&id) => {
            Ok(Outcome::Dispatch(id))
        }
        Some(w) => Err(format!(
            "schedule_job returned worker '{id}', which cannot take this job \
             (status {}, or it already failed this job)",
            field(w, "status")
        )),
        None => Err(format!("schedule_job returned '{id}', which is not the id of any worker")),
    }
}

fn now_ms() -> INT {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as INT).unwrap_or(0)
}

impl CompiledPolicy {
    pub fn compile(
        py: Python<'_>,
        source: &str,
        name: Option<&str>,
        limits: Limits,
    ) -> PyResult<Self> {
        let engine = build_engine(&limits);
        let locator = build_engine_with(&limits, true);
        let file =
            || name.map(|n| n.into_pyobject(py).unwrap().into_any().unbind()).unwrap_or(py.None());
        let ast = engine.compile(source).map_err(|e| {
            build(
                py,
                "PolicyCompileError",
                &parse_message(&e, source),
                e.position(),
                &[("file", file())],
            )
        })?;
        let arity =
            ast.iter_functions().filter(|f| f.name == "schedule_job").map(|f| f.params.len()).max();
        let arity = match arity {
            Some(n @ 1..=3) => n,
            Some(n) => {
                return Err(build(
                    py,
                    "PolicyCompileError",
                    &format!(
                        "schedule_job takes {n} parameters; \
                         expected fn schedule_job(job, pools, workers)"
                    ),
                    rhai::Position::new(1, 1),
                    &[("file", file())],
                ))
            }
            None => {
                return Err(build(
                    py,
                    "PolicyCompileError",
                    "the policy does not define fn schedule_job(job, pools, workers)",
                    rhai::Position::new(1, 1),
                    &[("file", file())],
                ))
            }
        };
        let natives = Arc::new(NativeTable::build(&ast));
        let entry = ast
            .iter_fn_def()
            .find(|f| f.name == "schedule_job" && f.params.len() == arity)
            .map_or(rhai::Position::NONE, |f| f.body.start_position());
        Ok(CompiledPolicy {
            locator,
            entry,
            engine,
            ast,
            natives,
            rotation: Arc::default(),
            limits,
            arity,
        })
    }
}

fn job_id_of(job: &Map) -> ImmutableString {
    job.get("id").map(|v| text(v).unwrap_or_else(|| v.to_string().into())).unwrap_or_default()
}

/// Everything one decision runs with, from the job and the state: the
/// workers the script sees (without those the job already failed on), the
/// clock, and the job's `max_tokens` for `estimated_time`.
fn prepare(
    job: Map,
    state: Arc<StateData>,
    now_ms: Option<INT>,
    started: Instant,
) -> (Call, Dynamic, Vec<ImmutableString>) {
    let job_id = job_id_of(&job);
    let failed: Vec<ImmutableString> = job
        .get("failed_workers")
        .and_then(|v| v.read_lock::<Array>().map(|a| a.iter().filter_map(text).collect()))
        .unwrap_or_default();
    let max_tokens = job.get("max_tokens").and_then(num).unwrap_or(256.0);
    // The precomputed array serves unless this job has failed somewhere.
    let workers = if failed.is_empty() {
        state.eligible_dyn.clone()
    } else {
        let eligible = state.eligible_dyn.read_lock::<Array>();
        freeze_array(
            eligible
                .iter()
                .flat_map(|a| a.iter())
                .filter(|w| text(&field(w, "id")).is_none_or(|id| !failed.contains(&id)))
                .cloned()
                .collect(),
        )
    };
    let now = now_ms.or(state.now).unwrap_or_else(now_ms_fn);
    let call = Call { job_id, state, workers, now, max_tokens, started };
    (call, Dynamic::from_map(job), failed)
}

impl CompiledPolicy {
    /// One decision for a caller in Rust (the simulator), on the calling
    /// thread: the outcome and how many actions came with it, or the class of
    /// the error (`PolicyRuntimeError`, `PolicyTimeout`, ...) when it failed.
    pub fn decide_native(
        &self,
        job: Map,
        state: Arc<StateData>,
        now_ms: INT,
    ) -> Result<(Outcome, usize), &'static str> {
        let (call, job_dyn, failed) = prepare(job, state, Some(now_ms), Instant::now());
        let (result, _, _) = self.run(&self.engine, &call, job_dyn, &self.rotation, &self.limits);
        match result.map(|v| interpret(v, &call.state, &failed)) {
            Ok(Ok(d)) => Ok((d.outcome, d.actions.len())),
            Ok(Err(_)) => Err("PolicyReturnError"),
            Err(err) => Err(classify(&err, &self.limits).0),
        }
    }
}

#[pymethods]
impl CompiledPolicy {
    #[new]
    #[pyo3(signature = (source, name = None, limits = None))]
    fn new(
        py: Python<'_>,
        source: &str,
        name: Option<&str>,
        limits: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        Self::compile(py, source, name, limits_from(limits)?)
    }

    /// The effective sandbox limits.
    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for key in LIMIT_KEYS {
            d.set_item(*key, self.limits.get(key))?;
        }
        Ok(d)
    }

    /// How many closures of the policy run natively (for diagnostics).
    #[getter]
    fn native_closures(&self) -> usize {
        self.natives.fns.len()
    }

    /// Runs one decision; answers a dict that `rbee.scheduler.Decision` wraps.
    ///
    /// `release_gil`: other Python threads run while the script does. Right
    /// for a caller that has threads to let run; a caller that decides on its
    /// event loop gains nothing from it and pays a hand-over of the GIL per
    /// decision, and the wait to get it back from whichever thread took it.
    #[pyo3(signature = (job, state, now_ms = None, release_gil = true))]
    fn decide<'py>(
        &self,
        py: Python<'py>,
        job: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
        now_ms: Option<INT>,
        release_gil: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let started = Instant::now();
        let state: Arc<StateData> = if let Ok(s) = state.cast::<State>() {
            s.get().snapshot()
        } else if let Ok(d) = state.cast::<PyDict>() {
            Arc::new(StateData::from_dict(d).map_err(|e| conversion_error(py, &e))?)
        } else {
            return Err(PyTypeError::new_err("state must be a rbee State or a dict"));
        };
        let job_dict =
            job.cast::<PyDict>().map_err(|_| PyTypeError::new_err("job must be a dict"))?;
        let job = job_map(job_dict).map_err(|e| conversion_error(py, &e))?;
        let (call, job_dyn, failed) = prepare(job, state, now_ms, started);
        let run = || {
            let (result, ctx, peak) =
                self.run(&self.engine, &call, job_dyn, &self.rotation, &self.limits);
            let decided = result.map(|v| interpret(v, &call.state, &failed));
            (decided, ctx, peak)
        };
        let (decided, ctx, peak) = if release_gil { py.detach(run) } else { run() };
        let elapsed_us = started.elapsed().as_micros() as u64;

        let mut logs: Vec<String> = ctx.logs;
        if ctx.dropped_logs > 0 {
            logs.push(format!("… {} more log lines dropped", ctx.dropped_logs));
        }
        let extra = |py: Python<'py>| -> PyResult<Vec<(&'static str, Py<PyAny>)>> {
            Ok(vec![
                ("logs", PyList::new(py, &logs)?.into_any().unbind()),
                ("operations", ctx.operations.into_pyobject(py)?.into_any().unbind()),
                ("elapsed_us", elapsed_us.into_pyobject(py)?.into_any().unbind()),
            ])
        };
        let decided = match decided {
            Err(err) => {
                let (class, message, pos) = classify(&err, &self.limits);
                let seen = if is_limit(class) { self.locate(py, job_dict, &call) } else { ctx.at };
                let pos = place(class, pos, seen, self.entry);
                return Err(build(py, class, &message, pos, &extra(py)?));
            }
            Ok(Err(message)) => {
                return Err(build(
                    py,
                    "PolicyReturnError",
                    &message,
                    rhai::Position::NONE,
                    &extra(py)?,
                ));
            }
            Ok(Ok(d)) => d,
        };

        let out = PyDict::new(py);
        let (kind, worker, reason, status, retry): (
            &str,
            Option<ImmutableString>,
            Option<ImmutableString>,
            Option<INT>,
            Option<INT>,
        ) = match decided.outcome {
            Outcome::Dispatch(id) => ("dispatch", Some(id), None, None, None),
            Outcome::Reject(r) => ("reject", None, Some(r.code), Some(r.status), None),
            Outcome::Wait(reason, ms) => ("wait", None, Some(reason), None, ms),
        };
        out.set_item("kind", kind)?;
        out.set_item("worker_id", worker.as_deref())?;
        out.set_item("reason", reason.as_deref())?;
        out.set_item("status", status)?;
        out.set_item("retry_after_ms", retry)?;
        let actions = PyList::empty(py);
        for a in &decided.actions {
            actions.append(map_to_py(py, a)?)?;
        }
        out.set_item("actions", actions)?;
        out.set_item("logs", PyList::new(py, &logs)?)?;
        out.set_item("elapsed_us", elapsed_us)?;
        out.set_item("operations", ctx.operations)?;
        out.set_item("memory_peak_bytes", peak.max(0) as u64)?;
        Ok(out)
    }
}

/// What one decision runs with.
#[derive(Clone)]
struct Call {
    job_id: ImmutableString,
    state: Arc<StateData>,
    workers: Dynamic,
    now: INT,
    max_tokens: rhai::FLOAT,
    started: Instant,
}

fn job_map(job: &Bound<'_, PyDict>) -> Result<Map, crate::convert::ConvertError> {
    let mut path = String::from("job");
    dict_to_map(job, &mut path, 0)
}

fn is_limit(class: &str) -> bool {
    matches!(
        class,
        "PolicyTimeout"
            | "TooManyOperations"
            | "MemoryLimitExceeded"
            | "DataTooLarge"
            | "StackOverflow"
    )
}

impl CompiledPolicy {
    /// Calls `schedule_job` once on `engine`, in a fresh sandbox session.
    fn run(
        &self,
        engine: &Engine,
        call: &Call,
        job: Dynamic,
        rotation: &Rotation,
        limits: &Limits,
    ) -> (Result<Dynamic, Box<rhai::EvalAltResult>>, Context, isize) {
        let ctx = Context {
            rng: stable_hash(call.job_id.as_bytes()),
            job_id: call.job_id.clone(),
            state: call.state.clone(),
            workers: call.workers.clone(),
            now_ms: call.now,
            max_tokens: Some(call.max_tokens),
            logs: Vec::new(),
            dropped_logs: 0,
            rotation: rotation.clone(),
            natives: self.natives.clone(),
            limits: limits.clone(),
            deadline: call.started + limits.timeout,
            operations: 0,
            tripped: None,
            at: Position::NONE,
        };
        let session = Session::enter(ctx);
        let mut scope = Scope::new();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let mut args = vec![job, call.state.pools_dyn.clone(), call.workers.clone()];
        args.truncate(self.arity);
        let result = engine.call_fn_with_options::<Dynamic>(
            options,
            &mut scope,
            &self.ast,
            "schedule_job",
            args,
        );
        let peak = crate::alloc::Meter::peak();
        let ctx = session.finish();
        // A limit a helper tripped after the last operation still counts.
        let result = match ctx.tripped {
            Some(t) if result.is_ok() => Err(helpers::terminated(t)),
            _ => result,
        };
        (result, ctx, peak)
    }

    /// Runs a decision that hit a limit again on the locating engine, with
    /// its own copy of the round-robin counters (nothing of it is kept), and
    /// answers where the script was when the limit hit. A time limit is
    /// re-run for at most 10 ms: a runaway script is by then where it spins.
    fn locate(&self, py: Python<'_>, job: &Bound<'_, PyDict>, call: &Call) -> Position {
        let Ok(job) = job_map(job) else { return Position::NONE };
        let rotation: Rotation =
            Arc::new(std::sync::Mutex::new(self.rotation.lock().unwrap().clone()));
        let mut limits = self.limits.clone();
        limits.timeout = limits.timeout.min(std::time::Duration::from_millis(10));
        let rerun = Call { started: Instant::now(), ..call.clone() };
        py.detach(|| {
            let (_, ctx, _) =
                self.run(&self.locator, &rerun, Dynamic::from_map(job), &rotation, &limits);
            ctx.at
        })
    }
}

/// Where to report an error. Rhai gives limit errors the position of the
/// outermost call, so for those the last expression the script was seen at
/// is more useful; other errors keep Rhai's position when they have one.
fn place(class: &str, rhai_pos: Position, seen: Position, entry: Position) -> Position {
    [if is_limit(class) { seen } else { rhai_pos }, rhai_pos, seen, entry]
        .into_iter()
        .find(|p| !p.is_none())
        .unwrap_or(Position::NONE)
}

fn now_ms_fn() -> INT {
    now_ms()
}

/// An engine with default limits, shared by `evaluate` calls.
fn default_engine() -> &'static (Engine, Limits) {
    static ENGINE: OnceLock<(Engine, Limits)> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let limits = Limits::default();
        (build_engine(&limits), limits)
    })
}

/// Evaluates a script in the sandbox (no state) and answers its value.
#[pyfunction]
#[pyo3(signature = (source, limits = None))]
pub fn evaluate<'py>(
    py: Python<'py>,
    source: &str,
    limits: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let owned;
    let (engine, limits) = match limits {
        None => {
            let d = default_engine();
            (&d.0, d.1.clone())
        }
        Some(l) => {
            let limits = limits_from(Some(l))?;
            owned = build_engine(&limits);
            (&owned, limits)
        }
    };
    let ast = engine.compile(source).map_err(|e| {
        build(py, "PolicyCompileError", &parse_message(&e, source), e.position(), &[])
    })?;
    let natives = Arc::new(NativeTable::build(&ast));
    let run = || {
        let started = Instant::now();
        let mut state = StateData::default();
        state.rebuild();
        let ctx = Context {
            rng: 0,
            job_id: ImmutableString::new(),
            workers: state.eligible_dyn.clone(),
            state: Arc::new(state),
            now_ms: now_ms(),
            max_tokens: None,
            logs: Vec::new(),
            dropped_logs: 0,
            rotation: Arc::default(),
            natives,
            limits: limits.clone(),
            deadline: started + limits.timeout,
            operations: 0,
            tripped: None,
            at: rhai::Position::NONE,
        };
        let session = Session::enter(ctx);
        let result = engine.eval_ast::<Dynamic>(&ast);
        let ctx = session.finish();
        // A limit a helper tripped after the last operation still counts.
        let result = match ctx.tripped {
            Some(t) if result.is_ok() => Err(helpers::terminated(t)),
            _ => result,
        };
        (result, ctx)
    };
    let (result, ctx) = py.detach(run);
    match result {
        Ok(v) => to_py(py, &v),
        Err(err) => {
            let (class, message, pos) = classify(&err, &limits);
            let pos = place(class, pos, ctx.at, rhai::Position::NONE);
            let logs = PyList::new(py, &ctx.logs)?.into_any().unbind();
            Err(build(py, class, &message, pos, &[("logs", logs)]))
        }
    }
}
