//! The discrete-event model of `rbee simulate`: arrivals, completions,
//! timers and expiries in simulated milliseconds; the queen's queue (priority
//! classes with aging, lookahead) and each worker's slots and local queue;
//! decisions along the fallback chain and worker updates made on the
//! engine's own state. `python/rbee/simulate/model.py` describes the model;
//! `tests/sim_reference.py` is the same loop in Python, which this one must
//! agree with job for job.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rhai::{Dynamic, ImmutableString, Map, INT};

use crate::convert::dict_to_map;
use crate::errors::conversion_error;
use crate::policy::{CompiledPolicy, Outcome};
use crate::state::State;

const QUEUED: u8 = 0;
const WAITING_LOCAL: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Complete,
    Wake,
    Expire,
}

/// An event: at a time, in the order made among equal times.
struct Event {
    at: f64,
    seq: u64,
    kind: Kind,
    job: usize,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.total_cmp(&other.at).then(self.seq.cmp(&other.seq))
    }
}

/// A worker of the simulated cluster; `Default` for the rest of the fields
/// is an idle one.
#[derive(Default)]
pub(super) struct Worker {
    pub(super) id: ImmutableString,
    pub(super) slots: i64,
    pub(super) ttft: f64,
    pub(super) tps: f64,
    pub(super) cost: f64,
    /// Every name of the models it serves (aliases included); empty: any.
    pub(super) models: HashSet<String>,
    /// `network_latency_ms`, which replaces the distance formula.
    pub(super) fixed_net: Option<f64>,
    pub(super) lat: Option<f64>,
    pub(super) lon: Option<f64>,
    pub(super) running: i64,
    pub(super) active: i64,
    pub(super) waiting: VecDeque<usize>,
    pub(super) busy_ms: f64,
    pub(super) completed: i64,
    pub(super) last_used_at: Option<INT>,
    pub(super) dirty: bool,
}

pub(super) struct Job<'py> {
    pub(super) seq: u64,
    pub(super) at: f64,
    pub(super) expires: f64,
    pub(super) deadline_at: Option<f64>,
    pub(super) cls: i64,
    model: Option<String>,
    prompt_tokens: f64,
    output_tokens: f64,
    lat: Option<f64>,
    lon: Option<f64>,
    /// The job as policies see it, and the map made of it; `None` while a
    /// decision has it.
    dict: Bound<'py, PyDict>,
    fields: Option<Map>,
    pub(super) outcome: Option<&'static str>,
    pub(super) reason: Option<ImmutableString>,
    pub(super) worker: Option<usize>,
    pub(super) dispatched: Option<f64>,
    pub(super) start: Option<f64>,
    pub(super) first_token: Option<f64>,
    pub(super) end: Option<f64>,
    pub(super) cost: f64,
    pub(super) decisions: i64,
    pub(super) state: u8,
    pub(super) wake_at: Option<f64>,
    pub(super) seen_version: i64,
    pub(super) net_ms: f64,
}

/// The jobs of one priority class in arrival order; finished ones are
/// skipped and dropped lazily.
#[derive(Default)]
struct ClassQueue {
    items: Vec<usize>,
    head: usize,
    gone: i64,
}

impl ClassQueue {
    fn trim(&mut self, jobs: &[Job<'_>]) {
        while self.head < self.items.len() && jobs[self.items[self.head]].state != QUEUED {
            self.head += 1;
            self.gone -= 1;
        }
        let live = (self.items.len() - self.head) as i64;
        if self.gone > 64 && self.gone * 2 > live {
            let head = self.head;
            let mut kept: Vec<usize> = Vec::with_capacity(live as usize);
            kept.extend(self.items[head..].iter().copied().filter(|&j| jobs[j].state == QUEUED));
            self.items = kept;
            self.head = 0;
            self.gone = 0;
        } else if self.head > 1024 && self.head * 2 > self.items.len() {
            self.items.drain(..self.head);
            self.head = 0;
        }
    }
}

pub(super) struct Network {
    pub(super) base_ms: f64,
    pub(super) ms_per_100km: f64,
    pub(super) unknown_ms: f64,
}

pub(super) struct Sim<'a, 'py> {
    py: Python<'py>,
    policies: &'a [PyRef<'py, CompiledPolicy>],
    state: &'a State,
    pub(super) workers: Vec<Worker>,
    by_id: HashMap<ImmutableString, usize>,
    pub(super) jobs: Vec<Job<'py>>,
    network: Network,
    capacity: Option<usize>,
    aging_ms: i64,
    lookahead: usize,
    epoch: INT,
    now: f64,
    version: i64,
    dirty: Vec<usize>,
    events: BinaryHeap<Reverse<Event>>,
    event_seq: u64,
    classes: Vec<ClassQueue>,
    queued: usize,
    pub(super) decisions: i64,
    pub(super) unknown_worker: i64,
    pub(super) model_mismatch: i64,
    pub(super) actions: i64,
    pub(super) fallbacks: HashMap<&'static str, i64>,
    pub(super) decide_time: Duration,
    pub(super) update_time: Duration,
    pub(super) updates: i64,
    ready: ImmutableString,
    busy: ImmutableString,
}

/// What the trace says of a job, read by `simulate`.
pub(super) struct Arrival {
    pub(super) at: f64,
    pub(super) expires: f64,
    pub(super) deadline_at: Option<f64>,
    pub(super) cls: i64,
    pub(super) model: Option<String>,
    pub(super) prompt_tokens: f64,
    pub(super) output_tokens: f64,
    pub(super) lat: Option<f64>,
    pub(super) lon: Option<f64>,
}

impl<'py> Job<'py> {
    /// The `seq`-th job of the trace (from 1), not yet arrived; `dict` is the
    /// job as policies see it.
    pub(super) fn new(seq: u64, a: Arrival, dict: Bound<'py, PyDict>) -> PyResult<Self> {
        let fields = convert_job(&dict)?;
        Ok(Job {
            seq,
            at: a.at,
            expires: a.expires,
            deadline_at: a.deadline_at,
            cls: a.cls.clamp(0, 4),
            model: a.model,
            prompt_tokens: a.prompt_tokens,
            output_tokens: a.output_tokens,
            lat: a.lat,
            lon: a.lon,
            dict,
            fields: Some(fields),
            outcome: None,
            reason: None,
            worker: None,
            dispatched: None,
            start: None,
            first_token: None,
            end: None,
            cost: 0.0,
            decisions: 0,
            state: QUEUED,
            wake_at: None,
            seen_version: -1,
            net_ms: 0.0,
        })
    }
}

/// The queue's settings and the clock a run starts from.
pub(super) struct Settings {
    pub(super) network: Network,
    pub(super) capacity: Option<usize>,
    pub(super) aging_ms: i64,
    pub(super) lookahead: usize,
    pub(super) epoch: INT,
}

impl<'a, 'py> Sim<'a, 'py> {
    pub(super) fn new(
        py: Python<'py>,
        policies: &'a [PyRef<'py, CompiledPolicy>],
        state: &'a State,
        workers: Vec<Worker>,
        jobs: Vec<Job<'py>>,
        settings: Settings,
    ) -> Self {
        let by_id = workers.iter().enumerate().map(|(i, w)| (w.id.clone(), i)).collect();
        Sim {
            py,
            policies,
            state,
            workers,
            by_id,
            jobs,
            network: settings.network,
            capacity: settings.capacity,
            aging_ms: settings.aging_ms,
            lookahead: settings.lookahead,
            epoch: settings.epoch,
            now: 0.0,
            version: 0,
            dirty: Vec::new(),
            events: BinaryHeap::new(),
            event_seq: 0,
            classes: (0..5).map(|_| ClassQueue::default()).collect(),
            queued: 0,
            decisions: 0,
            unknown_worker: 0,
            model_mismatch: 0,
            actions: 0,
            fallbacks: HashMap::new(),
            decide_time: Duration::ZERO,
            update_time: Duration::ZERO,
            updates: 0,
            ready: "ready".into(),
            busy: "busy".into(),
        }
    }
}

impl<'py> Sim<'_, 'py> {
    fn push(&mut self, at: f64, kind: Kind, job: usize) {
        self.event_seq += 1;
        self.events.push(Reverse(Event { at, seq: self.event_seq, kind, job }));
    }

    fn arrive(&mut self, j: usize) -> PyResult<()> {
        if self.queued == 0 && self.try_job(j)? {
            return Ok(());
        }
        if self.capacity.is_some_and(|c| self.queued >= c) {
            self.finish(j, "rejected", "queue_full".into());
            return Ok(());
        }
        self.enqueue(j);
        if self.queued > 1 {
            self.pump()?;
        }
        Ok(())
    }

    /// One decision. True when the job left the queue's hands (dispatched,
    /// or ended), false when it waits.
    fn try_job(&mut self, j: usize) -> PyResult<bool> {
        if !self.dirty.is_empty() {
            self.flush();
        }
        let now = self.now;
        let job = &mut self.jobs[j];
        // Most jobs are decided once: the first decision takes the job's map
        // instead of a copy, and a job that stays queued converts it again.
        let mut fields = match job.fields.take() {
            Some(map) if job.decisions == 0 => map,
            Some(map) => {
                let copy = map.clone();
                job.fields = Some(map);
                copy
            }
            None => convert_job(&job.dict)?,
        };
        let deadline =
            job.deadline_at.map_or(Dynamic::UNIT, |d| Dynamic::from_int((d - now) as INT));
        fields.insert("created_at".into(), Dynamic::from_int(self.epoch + job.at as INT));
        fields.insert("wait_ms".into(), Dynamic::from_int((now - job.at) as INT));
        fields.insert("deadline".into(), deadline);
        job.decisions += 1;
        self.decisions += 1;
        let now_ms = self.epoch + now as INT;

        let started = Instant::now();
        let mut decided = None;
        let policies = self.policies;
        let last = policies.len().saturating_sub(1);
        for (i, policy) in policies.iter().enumerate() {
            // A fresh snapshot per call, dropped with it, so that the next
            // update edits the state in place instead of copying it.
            let snapshot = self.state.snapshot();
            let job = if i == last { std::mem::take(&mut fields) } else { fields.clone() };
            match policy.decide_native(job, snapshot, now_ms) {
                Ok(d) => {
                    decided = Some(d);
                    break;
                }
                Err(class) => *self.fallbacks.entry(class).or_default() += 1,
            }
        }
        self.decide_time += started.elapsed();
        let Some((outcome, actions)) = decided else {
            // Even the built-in default failed: the queen answers 503.
            self.finish(j, "rejected", "scheduler_error".into());
            return Ok(true);
        };
        if actions > 0 {
            self.actions += 1;
        }
        match outcome {
            Outcome::Dispatch(id) => match self.by_id.get(&id) {
                Some(&w) => {
                    self.dispatch(j, w);
                    return Ok(true);
                }
                None => {
                    // The queen keeps a job whose worker it does not know queued.
                    self.unknown_worker += 1;
                    self.jobs[j].wake_at = None;
                }
            },
            Outcome::Reject(r) => {
                let reason = if r.code.is_empty() { "rejected".into() } else { r.code };
                self.finish(j, "rejected", reason);
                return Ok(true);
            }
            Outcome::Wait(_, ms) => {
                let wake_at = ms.filter(|ms| *ms != 0).map(|ms| now + ms as f64);
                self.jobs[j].wake_at = wake_at;
                if let Some(at) = wake_at {
                    self.push(at, Kind::Wake, j);
                }
            }
        }
        let job = &mut self.jobs[j];
        job.seen_version = self.version;
        if job.fields.is_none() {
            job.fields = Some(convert_job(&job.dict)?);
        }
        Ok(false)
    }

    /// Publishes the workers that changed since the last decision, once
    /// each: the fields a slot taken or freed changes (the engine works out
    /// `load` from them).
    fn flush(&mut self) {
        let started = Instant::now();
        for &w in &self.dirty {
            let worker = &mut self.workers[w];
            worker.dirty = false;
            let status = if worker.active >= worker.slots { &self.busy } else { &self.ready };
            let (active, at) = (worker.active, worker.last_used_at);
            self.state.update(|s| s.update_slots(&worker.id, active, status, at, (None, None)));
        }
        self.updates += self.dirty.len() as i64;
        self.dirty.clear();
        self.update_time += started.elapsed();
    }

    fn mark(&mut self, w: usize) {
        if !self.workers[w].dirty {
            self.workers[w].dirty = true;
            self.dirty.push(w);
        }
        self.version += 1;
    }

    fn enqueue(&mut self, j: usize) {
        let cls = self.jobs[j].cls as usize;
        self.classes[cls].items.push(j);
        self.queued += 1;
        let expires = self.jobs[j].expires;
        self.push(expires, Kind::Expire, j);
    }

    fn leave_queue(&mut self, j: usize) {
        let cls = self.jobs[j].cls as usize;
        self.classes[cls].gone += 1;
        self.queued -= 1;
    }

    /// Looks at the queue in order, deciding each job that may have a new
    /// answer: its timer fired, or a worker changed since it last waited.
    fn pump(&mut self) -> PyResult<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let now = self.now;
        let mut heads: Vec<(usize, usize)> = Vec::with_capacity(self.classes.len());
        for (c, queue) in self.classes.iter_mut().enumerate() {
            queue.trim(&self.jobs);
            if queue.head < queue.items.len() {
                heads.push((c, queue.head));
            }
        }
        let mut in_a_row = 0;
        while !heads.is_empty() {
            // The next job is the head with the smallest (class after aging,
            // arrival); within one class that order is the list's order.
            let mut best = 0;
            let mut best_key = (i64::MAX, u64::MAX);
            for (e, &(c, index)) in heads.iter().enumerate() {
                let job = &self.jobs[self.classes[c].items[index]];
                let aged = (now - job.at) as i64 / self.aging_ms;
                let key = ((job.cls - aged).max(0), job.seq);
                if key < best_key {
                    best = e;
                    best_key = key;
                }
            }
            let (c, mut index) = heads[best];
            let items = &self.classes[c].items;
            let j = items[index];
            index += 1;
            while index < items.len() && self.jobs[items[index]].state != QUEUED {
                index += 1;
            }
            if index < items.len() {
                heads[best].1 = index;
            } else {
                heads.remove(best);
            }
            let job = &self.jobs[j];
            if now >= job.expires {
                self.expire(j);
                continue;
            }
            match job.wake_at {
                Some(at) if now < at => continue,
                None if job.seen_version == self.version => continue,
                _ => {}
            }
            if self.try_job(j)? {
                self.leave_queue(j);
                in_a_row = 0;
            } else {
                in_a_row += 1;
                if self.lookahead > 0 && in_a_row >= self.lookahead {
                    break;
                }
            }
        }
        for queue in &mut self.classes {
            queue.trim(&self.jobs);
        }
        Ok(())
    }

    fn network_ms(&self, w: usize, j: usize) -> f64 {
        let worker = &self.workers[w];
        if let Some(ms) = worker.fixed_net {
            return ms;
        }
        let job = &self.jobs[j];
        match (job.lat, job.lon, worker.lat, worker.lon) {
            (Some(lat1), Some(lon1), Some(lat2), Some(lon2)) => {
                let km = great_circle_km(lat1, lon1, lat2, lon2);
                self.network.base_ms + self.network.ms_per_100km * km / 100.0
            }
            _ => self.network.unknown_ms,
        }
    }

    fn dispatch(&mut self, j: usize, w: usize) {
        if let Some(model) = &self.jobs[j].model {
            let served = &self.workers[w].models;
            if !served.is_empty() && !served.contains(model) {
                self.model_mismatch += 1;
            }
        }
        let net = self.network_ms(w, j);
        let now = self.now;
        let job = &mut self.jobs[j];
        job.worker = Some(w);
        job.dispatched = Some(now);
        job.net_ms = net;
        let worker = &mut self.workers[w];
        worker.active += 1;
        worker.last_used_at = Some(self.epoch + now as INT);
        let free = worker.running < worker.slots;
        self.mark(w);
        if free {
            self.start(j, w);
        } else {
            self.jobs[j].state = WAITING_LOCAL;
            self.workers[w].waiting.push_back(j);
        }
    }

    fn start(&mut self, j: usize, w: usize) {
        let worker = &mut self.workers[w];
        worker.running += 1;
        let now = self.now;
        let job = &mut self.jobs[j];
        job.state = RUNNING;
        job.start = Some(now);
        let first = now + job.net_ms + worker.ttft;
        let end = first + job.output_tokens * 1000.0 / worker.tps;
        job.first_token = Some(first);
        job.end = Some(end);
        self.push(end, Kind::Complete, j);
    }

    fn complete(&mut self, j: usize) -> PyResult<()> {
        let w = self.jobs[j].worker.expect("a completing job has a worker");
        let job = &mut self.jobs[j];
        let worker = &mut self.workers[w];
        worker.running -= 1;
        worker.active -= 1;
        worker.busy_ms += job.end.unwrap_or(0.0) - job.start.unwrap_or(0.0);
        worker.completed += 1;
        job.cost = (job.prompt_tokens + job.output_tokens) * worker.cost;
        job.outcome = Some("completed");
        job.state = DONE;
        if let Some(next) = worker.waiting.pop_front() {
            self.start(next, w);
        }
        self.mark(w);
        self.pump()
    }

    fn expire(&mut self, j: usize) {
        let job = &self.jobs[j];
        let late = job.deadline_at.is_some_and(|d| job.expires >= d);
        let expires = job.expires;
        self.leave_queue(j);
        self.finish(j, "expired", if late { "deadline_exceeded" } else { "timeout" }.into());
        self.jobs[j].end = Some(expires);
    }

    fn finish(&mut self, j: usize, outcome: &'static str, reason: ImmutableString) {
        let now = self.now;
        let job = &mut self.jobs[j];
        job.outcome = Some(outcome);
        job.reason = Some(reason);
        job.state = DONE;
        job.end = Some(now);
    }

    pub(super) fn run(
        &mut self,
        progress: Option<&Bound<'py, PyAny>>,
        tick: usize,
    ) -> PyResult<()> {
        let count = self.jobs.len();
        let tick = tick.max(1);
        let mut i = 0;
        loop {
            let arrival = (i < count).then(|| self.jobs[i].at);
            if let Some(Reverse(next)) = self.events.peek() {
                if arrival.is_none_or(|a| next.at <= a) {
                    let Reverse(event) = self.events.pop().expect("peeked");
                    self.now = event.at;
                    let j = event.job;
                    if event.kind == Kind::Complete {
                        self.complete(j)?;
                    } else if self.jobs[j].state == QUEUED {
                        if event.kind == Kind::Expire {
                            self.expire(j);
                        } else if self.jobs[j].wake_at.is_some_and(|w| w <= event.at) {
                            self.pump()?;
                        }
                    }
                    continue;
                }
            }
            let Some(arrival) = arrival else { break };
            self.now = arrival;
            i += 1;
            self.arrive(i - 1)?;
            if i % tick == 0 {
                self.py.check_signals()?;
                if let Some(p) = progress {
                    p.call1((tick,))?;
                }
            }
        }
        if let Some(p) = progress {
            if !count.is_multiple_of(tick) {
                p.call1((count % tick,))?;
            }
        }
        // What is left to publish (the last completions) is published, so
        // the state ends as the cluster does.
        if !self.dirty.is_empty() {
            self.flush();
        }
        Ok(())
    }
}

fn convert_job(dict: &Bound<'_, PyDict>) -> PyResult<Map> {
    let mut path = String::from("job");
    dict_to_map(dict, &mut path, 0).map_err(|e| conversion_error(dict.py(), &e))
}

/// The distance of `rbee.simulate.cluster.great_circle_km`, step by step as
/// it computes it, so a run gives the same network times as that function.
fn great_circle_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let (dp, dl) = (p2 - p1, (lon2 - lon1).to_radians());
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * a.sqrt().min(1.0).asin()
}
