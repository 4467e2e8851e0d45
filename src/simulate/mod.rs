//! `rbee._engine.simulate`: the event loop of `rbee simulate`, run here
//! rather than in Python.
//!
//! A simulated job is a decision, one or two worker updates and a few events.
//! Written in Python, with every decision and update crossing into the engine
//! and back, the crossings and the interpreter took over a third of a job's
//! time (docs/benchmarks.md, "Simulator"). Here a decision gets the job as a
//! Rhai map and the state as the engine holds it, with nothing converted.
//! This module reads the cluster and the trace from their Python objects and
//! answers rows for `python/rbee/simulate/model.py`; `model` is the loop.

mod model;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use rhai::INT;

use crate::policy::CompiledPolicy;
use crate::state::State;
use model::{Arrival, Job, Network, Settings, Sim, Worker};

type WorkerSpec<'py> = (
    Bound<'py, PyAny>,
    String,
    i64,
    f64,
    f64,
    f64,
    Vec<String>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
);

/// Runs a simulation; `rbee.simulate.model.Simulation.run` is its Python face.
///
/// `policies` is the fallback chain (the active policy, then the built-in
/// default); `state` holds the cluster and is updated as the run goes.
/// Workers are `(object, id, slots, ttft_ms, tokens_per_sec,
/// cost_per_token, model names, network_latency_ms, latitude, longitude)`;
/// jobs are the trace's `TraceJob` objects in arrival order (their `fields`
/// are the job as policies see it), with `classes` giving the priority class
/// of a priority (`default_class` for the rest) and `default_timeout_ms` the
/// queue's timeout. `progress(n)` is called after every `tick` arrivals. The
/// answer holds a tuple per job in the field order of `model.JobRecord` (with
/// the job's `TraceJob` and its worker's `object`), a tuple per worker, and
/// the run's counters.
#[pyfunction]
#[pyo3(signature = (
    policies, state, workers, jobs, classes, default_class, network, aging_ms,
    default_timeout_ms, capacity, lookahead, epoch, progress = None, tick = 1
))]
#[allow(clippy::too_many_arguments)]
pub fn simulate<'py>(
    py: Python<'py>,
    policies: Vec<PyRef<'py, CompiledPolicy>>,
    state: PyRef<'py, State>,
    workers: Vec<WorkerSpec<'py>>,
    jobs: Vec<Bound<'py, PyAny>>,
    classes: Bound<'py, PyDict>,
    default_class: i64,
    network: (f64, f64, f64),
    aging_ms: i64,
    default_timeout_ms: i64,
    capacity: Option<usize>,
    lookahead: usize,
    epoch: INT,
    progress: Option<Bound<'py, PyAny>>,
    tick: usize,
) -> PyResult<Bound<'py, PyDict>> {
    if aging_ms < 1 {
        return Err(pyo3::exceptions::PyValueError::new_err("aging_ms must be 1 or more"));
    }
    let mut objects = Vec::with_capacity(workers.len());
    let mut sim_workers = Vec::with_capacity(workers.len());
    for (object, id, slots, ttft, tps, cost, models, fixed_net, lat, lon) in workers {
        objects.push(object);
        let models = models.into_iter().collect();
        let id = id.into();
        sim_workers.push(Worker {
            id,
            slots,
            ttft,
            tps,
            cost,
            models,
            fixed_net,
            lat,
            lon,
            ..Default::default()
        });
    }
    let mut sim_jobs = Vec::with_capacity(jobs.len());
    for (i, item) in jobs.iter().enumerate() {
        let (arrival, dict) = read_job(item, &classes, default_class, default_timeout_ms)?;
        sim_jobs.push(Job::new(i as u64 + 1, arrival, dict)?);
    }
    let settings = Settings {
        network: Network { base_ms: network.0, ms_per_100km: network.1, unknown_ms: network.2 },
        capacity,
        aging_ms,
        lookahead,
        epoch,
    };
    let mut sim = Sim::new(py, &policies, &state, sim_workers, sim_jobs, settings);
    sim.run(progress.as_ref(), tick)?;

    let job_rows = PyList::empty(py);
    for (job, item) in sim.jobs.iter().zip(&jobs) {
        let worker = match job.worker {
            Some(w) => objects[w].clone(),
            None => py.None().into_bound(py),
        };
        let row = PyTuple::new(
            py,
            [
                item.clone(),
                job.seq.into_pyobject(py)?.into_any(),
                job.cls.into_pyobject(py)?.into_any(),
                job.at.into_pyobject(py)?.into_any(),
                job.expires.into_pyobject(py)?.into_any(),
                opt(py, job.deadline_at)?,
                job.outcome.into_pyobject(py)?.into_any(),
                job.reason.as_deref().into_pyobject(py)?.into_any(),
                worker,
                opt(py, job.dispatched)?,
                opt(py, job.start)?,
                opt(py, job.first_token)?,
                opt(py, job.end)?,
                job.cost.into_pyobject(py)?.into_any(),
                job.decisions.into_pyobject(py)?.into_any(),
                job.state.into_pyobject(py)?.into_any(),
                opt(py, job.wake_at)?,
                job.seen_version.into_pyobject(py)?.into_any(),
                job.net_ms.into_pyobject(py)?.into_any(),
            ],
        )?;
        job_rows.append(row)?;
    }
    let worker_rows = PyList::empty(py);
    for w in &sim.workers {
        worker_rows.append((w.busy_ms, w.completed, w.running, w.active, w.last_used_at))?;
    }
    let fallbacks = PyDict::new(py);
    for (class, n) in &sim.fallbacks {
        fallbacks.set_item(*class, *n)?;
    }
    let out = PyDict::new(py);
    out.set_item("jobs", job_rows)?;
    out.set_item("workers", worker_rows)?;
    out.set_item("decisions", sim.decisions)?;
    out.set_item("unknown_worker", sim.unknown_worker)?;
    out.set_item("model_mismatch", sim.model_mismatch)?;
    out.set_item("actions", sim.actions)?;
    out.set_item("fallbacks", fallbacks)?;
    out.set_item("decide_s", sim.decide_time.as_secs_f64())?;
    out.set_item("update_s", sim.update_time.as_secs_f64())?;
    out.set_item("updates", sim.updates)?;
    Ok(out)
}

/// What a `TraceJob` says of its job, and the job as policies see it.
fn read_job<'py>(
    item: &Bound<'py, PyAny>,
    classes: &Bound<'py, PyDict>,
    default_class: i64,
    default_timeout_ms: i64,
) -> PyResult<(Arrival, Bound<'py, PyDict>)> {
    let py = item.py();
    let get = |name: &Bound<'py, PyString>| item.getattr(name);
    let at: f64 = get(intern!(py, "at_ms"))?.extract()?;
    let timeout = get(intern!(py, "timeout_ms"))?.extract::<Option<i64>>()?;
    let deadline_ms = get(intern!(py, "deadline_ms"))?.extract::<Option<i64>>()?;
    // A queued job ends at its timeout, or at its deadline if that comes first.
    let deadline_at = deadline_ms.map(|d| at + d as f64);
    let mut expires = at + timeout.unwrap_or(default_timeout_ms) as f64;
    if let Some(d) = deadline_at {
        expires = expires.min(d);
    }
    let cls = match classes.get_item(get(intern!(py, "priority"))?)? {
        Some(c) => c.extract::<i64>()?,
        None => default_class,
    };
    let arrival = Arrival {
        at,
        expires,
        deadline_at,
        cls,
        model: get(intern!(py, "model"))?.extract()?,
        prompt_tokens: get(intern!(py, "prompt_tokens"))?.extract()?,
        output_tokens: get(intern!(py, "output_tokens"))?.extract()?,
        lat: get(intern!(py, "latitude"))?.extract()?,
        lon: get(intern!(py, "longitude"))?.extract()?,
    };
    Ok((arrival, get(intern!(py, "fields"))?.cast_into::<PyDict>()?))
}

fn opt<'py>(py: Python<'py>, v: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
    Ok(v.into_pyobject(py)?.into_any())
}
