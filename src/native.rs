//! Native evaluation of simple closures.
//!
//! Calling a script closure costs about 0.7 us, so `workers.filter(|w| w.gpus > 1)`
//! over 1,000 workers would spend most of a decision in call overhead. When a
//! policy is compiled, every closure whose body is a simple expression (field
//! paths of its parameter or of captured variables, constants, comparisons,
//! `&&`, `||`, `!`, arithmetic and `distance`) is translated into a `Node`
//! tree. The list helpers evaluate that tree directly and call the real closure
//! only when the tree cannot decide with the exact meaning Rhai would give
//! (mismatched types, `()`, overflow): the result is always what Rhai computes.

use std::collections::HashMap;
use std::sync::Arc;

use crate::context;
use crate::record::{hot_slot, Rec, ESTIMATE};
use rhai::{Dynamic, Expr, ImmutableString, Map, Stmt, AST, FLOAT, INT};

#[derive(Debug, Clone)]
pub enum Node {
    Const(Val),
    /// A field path of the closure's parameter, e.g. `w.geo.region`.
    Item(Path),
    /// A field path of a captured variable, e.g. `job.deadline`.
    Captured(usize, Path),
    Cmp(CmpOp, Box<Node>, Box<Node>),
    Arith(ArithOp, Box<Node>, Box<Node>),
    Neg(Box<Node>),
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    Distance(Box<[Node; 4]>),
    /// `w.estimated_time` with the job's `max_tokens` read once per pass
    /// (`bind`), instead of from the decision's context for every worker.
    Estimate(FLOAT),
}

#[derive(Debug, Clone, Copy)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, Copy)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// Property names after a variable; `slot` is the record slot of the first
/// one when it is a hot field (see `record.rs`).
#[derive(Debug, Clone)]
pub struct Path {
    props: Vec<ImmutableString>,
    slot: Option<usize>,
}

impl Path {
    fn new(props: Vec<ImmutableString>) -> Self {
        let slot = props.first().and_then(|p| hot_slot(p));
        Path { props, slot }
    }
}

/// The values native evaluation works on.
#[derive(Debug, Clone)]
pub enum Val {
    Unit,
    Bool(bool),
    Int(INT),
    Float(FLOAT),
    Str(ImmutableString),
}

impl Val {
    fn of(d: &Dynamic) -> Option<Val> {
        // Types asked first, numbers first: a failed `as_*` works out a type name.
        if d.is_float() {
            d.as_float().ok().map(Val::Float)
        } else if d.is_int() {
            d.as_int().ok().map(Val::Int)
        } else if d.is_unit() {
            Some(Val::Unit)
        } else if d.is_bool() {
            d.as_bool().ok().map(Val::Bool)
        } else {
            d.read_lock::<ImmutableString>().map(|s| Val::Str(s.clone()))
        }
    }

    pub fn into_dynamic(self) -> Dynamic {
        match self {
            Val::Unit => Dynamic::UNIT,
            Val::Bool(b) => Dynamic::from_bool(b),
            Val::Int(i) => Dynamic::from_int(i),
            Val::Float(f) => Dynamic::from_float(f),
            Val::Str(s) => Dynamic::from(s),
        }
    }
}

/// A compiled closure. Captured values come first in the closure's
/// parameters (Rhai curries them), the item last.
#[derive(Debug, Clone)]
pub struct NativeFn {
    pub node: Node,
}

/// Compiled closures of one policy, by the name Rhai gives the closure.
#[derive(Debug, Default)]
pub struct NativeTable {
    pub fns: HashMap<String, Arc<NativeFn>>,
    /// Parameter count of every script function, compiled or not.
    pub arity: HashMap<String, usize>,
}

impl NativeTable {
    pub fn build(ast: &AST) -> Self {
        let mut table = NativeTable::default();
        for def in ast.iter_fn_def() {
            table.arity.insert(def.name.to_string(), def.params.len());
            if !def.name.starts_with("anon$") || def.params.is_empty() {
                continue;
            }
            let body = body_of(def);
            let params: Vec<&str> = def.params.iter().map(|p| p.as_str()).collect();
            if let Some(node) = body_expr(&body).and_then(|e| compile(e, &params)) {
                table.fns.insert(def.name.to_string(), Arc::new(NativeFn { node }));
            }
        }
        table
    }
}

/// The top-level statements of a script function's body.
///
/// Rhai does not export the type that holds a body, but it walks one: an AST
/// made of just this function yields the body's statements as its root nodes.
fn body_of(def: &rhai::Shared<rhai::ScriptFuncDef>) -> Vec<Stmt> {
    let mut lib = rhai::Module::new();
    lib.set_script_fn(def.clone());
    let ast = AST::new(Vec::<Stmt>::new(), lib);
    let mut roots = Vec::new();
    ast.walk(&mut |path: &[rhai::ASTNode]| {
        if let [rhai::ASTNode::Stmt(s)] = path {
            roots.push((*s).clone());
        }
        true
    });
    roots
}

/// The single expression a closure body consists of, if it is that simple.
fn body_expr(stmts: &[Stmt]) -> Option<ExprRef<'_>> {
    match stmts {
        [Stmt::Expr(e)] => Some(ExprRef::Expr(e)),
        [Stmt::Return(Some(e), ..)] => Some(ExprRef::Expr(e)),
        [Stmt::FnCall(call, ..)] => Some(ExprRef::Call(call)),
        [Stmt::Block(block)] => body_expr(block.statements()),
        _ => None,
    }
}

enum ExprRef<'a> {
    Expr(&'a Expr),
    Call(&'a rhai::FnCallExpr),
}

fn compile(e: ExprRef<'_>, params: &[&str]) -> Option<Node> {
    match e {
        ExprRef::Expr(e) => compile_expr(e, params),
        ExprRef::Call(c) => compile_call(c, params),
    }
}

fn compile_expr(e: &Expr, params: &[&str]) -> Option<Node> {
    Some(match e {
        Expr::BoolConstant(b, _) => Node::Const(Val::Bool(*b)),
        Expr::IntegerConstant(i, _) => Node::Const(Val::Int(*i)),
        Expr::FloatConstant(f, _) => Node::Const(Val::Float(**f)),
        Expr::StringConstant(s, _) => Node::Const(Val::Str(s.clone())),
        Expr::Unit(_) => Node::Const(Val::Unit),
        Expr::Variable(..) | Expr::Dot(..) => path(e, params)?,
        Expr::And(list, _) => {
            Node::And(list.iter().map(|x| compile_expr(x, params)).collect::<Option<_>>()?)
        }
        Expr::Or(list, _) => {
            Node::Or(list.iter().map(|x| compile_expr(x, params)).collect::<Option<_>>()?)
        }
        Expr::FnCall(call, _) => compile_call(call, params)?,
        Expr::Stmt(block) => compile(body_expr(block.statements())?, params)?,
        _ => return None,
    })
}

fn compile_call(call: &rhai::FnCallExpr, params: &[&str]) -> Option<Node> {
    let args: Vec<Node> =
        call.args.iter().map(|a| compile_expr(a, params)).collect::<Option<_>>()?;
    let name = call.name.as_str();
    let mut args = args.into_iter();
    let mut next = || args.next().map(Box::new);
    Some(match (name, call.args.len()) {
        ("<", 2) => Node::Cmp(CmpOp::Lt, next()?, next()?),
        ("<=", 2) => Node::Cmp(CmpOp::Le, next()?, next()?),
        (">", 2) => Node::Cmp(CmpOp::Gt, next()?, next()?),
        (">=", 2) => Node::Cmp(CmpOp::Ge, next()?, next()?),
        ("==", 2) => Node::Cmp(CmpOp::Eq, next()?, next()?),
        ("!=", 2) => Node::Cmp(CmpOp::Ne, next()?, next()?),
        ("+", 2) => Node::Arith(ArithOp::Add, next()?, next()?),
        ("-", 2) => Node::Arith(ArithOp::Sub, next()?, next()?),
        ("*", 2) => Node::Arith(ArithOp::Mul, next()?, next()?),
        ("/", 2) => Node::Arith(ArithOp::Div, next()?, next()?),
        ("-", 1) => Node::Neg(next()?),
        ("!", 1) => Node::Not(next()?),
        ("distance", 4) => Node::Distance(Box::new([*next()?, *next()?, *next()?, *next()?])),
        _ => return None,
    })
}

/// `w`, `w.a.b`, `job.deadline`: a variable that is a closure parameter,
/// followed by plain property accesses.
fn path(e: &Expr, params: &[&str]) -> Option<Node> {
    let (root, props) = match e {
        Expr::Variable(v, ..) => (v.1.as_str(), Vec::new()),
        Expr::Dot(bin, flags, _) => {
            // `?.` has its own meaning for `()`; leave it to Rhai.
            if flags.intersects(rhai::ASTFlags::NEGATED) {
                return None;
            }
            let Expr::Variable(v, ..) = &bin.lhs else { return None };
            let mut props = Vec::new();
            properties(&bin.rhs, &mut props)?;
            (v.1.as_str(), props)
        }
        _ => return None,
    };
    let index = params.iter().position(|p| *p == root)?;
    if index + 1 == params.len() {
        Some(Node::Item(Path::new(props)))
    } else {
        Some(Node::Captured(index, Path::new(props)))
    }
}

fn properties(e: &Expr, out: &mut Vec<ImmutableString>) -> Option<()> {
    match e {
        Expr::Property(p, _) => {
            out.push(p.2.clone());
            Some(())
        }
        Expr::Dot(bin, flags, _) if !flags.intersects(rhai::ASTFlags::NEGATED) => {
            properties(&bin.lhs, out)?;
            properties(&bin.rhs, out)
        }
        _ => None,
    }
}

/// Evaluation result: a value, or "ask Rhai" when the meaning depends on
/// rules this evaluator does not reproduce.
pub type Eval = Option<Val>;

fn lookup(root: &Dynamic, path: &Path) -> Eval {
    let Some((first, rest)) = path.props.split_first() else { return Val::of(root) };
    if let Some(r) = root.read_lock::<Rec>() {
        return match path.slot {
            Some(slot) => found(r.slot(slot), rest),
            None => found(r.get_cold(first).as_ref(), rest),
        };
    }
    descend(root, &path.props)
}

fn found(value: Option<&Dynamic>, rest: &[ImmutableString]) -> Eval {
    match value {
        Some(v) => descend(v, rest),
        None if rest.is_empty() => Some(Val::Unit),
        None => None,
    }
}

/// Walks plain maps. Only maps are walked: a property of anything else may be
/// a registered getter, which Rhai must run.
fn descend(value: &Dynamic, props: &[ImmutableString]) -> Eval {
    let Some((first, rest)) = props.split_first() else { return Val::of(value) };
    let map = value.read_lock::<Map>()?;
    found(map.get(first.as_str()), rest)
}

impl NativeFn {
    pub fn eval(&self, item: &Dynamic, curry: &[Dynamic]) -> Eval {
        eval(&self.node, item, curry)
    }

    /// The closure with the captured values it reads (`job.deadline`) put
    /// in as constants, for a pass over an array: they cannot change during
    /// it (a compiled closure is an expression without side effects), and
    /// reading them once instead of once per element saves a map lookup per
    /// element. A value that only Rhai may read stays as it is.
    pub fn bind(&self, curry: &[Dynamic]) -> NativeFn {
        NativeFn { node: bind(&self.node, curry) }
    }
}

fn bind(node: &Node, curry: &[Dynamic]) -> Node {
    let all = |list: &[Node]| list.iter().map(|x| bind(x, curry)).collect();
    let one = |x: &Node| Box::new(bind(x, curry));
    match node {
        Node::Captured(i, props) => match curry.get(*i).and_then(|root| lookup(root, props)) {
            Some(v) => Node::Const(v),
            None => node.clone(),
        },
        Node::Item(path) if path.props.len() == 1 && path.props[0] == ESTIMATE => {
            match context::with(|c| c.max_tokens).flatten() {
                Some(max_tokens) => Node::Estimate(max_tokens),
                None => node.clone(),
            }
        }
        Node::Const(_) | Node::Item(_) | Node::Estimate(_) => node.clone(),
        Node::Cmp(op, a, b) => Node::Cmp(*op, one(a), one(b)),
        Node::Arith(op, a, b) => Node::Arith(*op, one(a), one(b)),
        Node::Neg(a) => Node::Neg(one(a)),
        Node::Not(a) => Node::Not(one(a)),
        Node::And(list) => Node::And(all(list)),
        Node::Or(list) => Node::Or(all(list)),
        Node::Distance(args) => Node::Distance(Box::new(args.clone().map(|a| bind(&a, curry)))),
    }
}

fn as_f(v: &Val) -> Option<FLOAT> {
    match v {
        Val::Int(i) => Some(*i as FLOAT),
        Val::Float(f) => Some(*f),
        _ => None,
    }
}

fn eval(node: &Node, item: &Dynamic, curry: &[Dynamic]) -> Eval {
    match node {
        Node::Const(v) => Some(v.clone()),
        Node::Item(props) => lookup(item, props),
        Node::Estimate(max_tokens) => match item.read_lock::<Rec>() {
            Some(r) => match r.estimate_for(*max_tokens) {
                Some(ms) => Some(Val::Float(ms)),
                // No estimate (no tokens_per_sec): a stored field, as `Rec::get_cold`.
                None => found(r.field(ESTIMATE), &[]),
            },
            None => descend(item, &[ESTIMATE.into()]),
        },
        Node::Captured(i, props) => lookup(curry.get(*i)?, props),
        Node::Cmp(op, a, b) => {
            let (a, b) = (eval(a, item, curry)?, eval(b, item, curry)?);
            let ord = match (&a, &b) {
                (Val::Int(x), Val::Int(y)) => x.partial_cmp(y),
                (Val::Str(x), Val::Str(y)) => x.as_str().partial_cmp(y.as_str()),
                (Val::Bool(x), Val::Bool(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
                    x.partial_cmp(y)
                }
                (Val::Unit, Val::Unit) if matches!(op, CmpOp::Eq | CmpOp::Ne) => {
                    Some(std::cmp::Ordering::Equal)
                }
                (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
                    as_f(&a)?.partial_cmp(&as_f(&b)?)
                }
                // Values of different types never compare in Rhai: every
                // comparison is false except `!=` (`None` below).
                (Val::Unit, _) | (_, Val::Unit) | (Val::Str(_), _) | (_, Val::Str(_)) => None,
                // bool against a number, or bools ordered: leave it to Rhai.
                _ => return None,
            };
            let r = match (op, ord) {
                (CmpOp::Ne, None) => true,
                (_, None) => false,
                (CmpOp::Lt, Some(o)) => o.is_lt(),
                (CmpOp::Le, Some(o)) => o.is_le(),
                (CmpOp::Gt, Some(o)) => o.is_gt(),
                (CmpOp::Ge, Some(o)) => o.is_ge(),
                (CmpOp::Eq, Some(o)) => o.is_eq(),
                (CmpOp::Ne, Some(o)) => o.is_ne(),
            };
            Some(Val::Bool(r))
        }
        Node::Arith(op, a, b) => {
            let (a, b) = (eval(a, item, curry)?, eval(b, item, curry)?);
            if let (Val::Int(x), Val::Int(y)) = (&a, &b) {
                // Overflow and division by zero are errors in Rhai: let it say so.
                return match op {
                    ArithOp::Add => x.checked_add(*y),
                    ArithOp::Sub => x.checked_sub(*y),
                    ArithOp::Mul => x.checked_mul(*y),
                    ArithOp::Div => x.checked_div(*y),
                }
                .map(Val::Int);
            }
            let (x, y) = (as_f(&a)?, as_f(&b)?);
            Some(Val::Float(match op {
                ArithOp::Add => x + y,
                ArithOp::Sub => x - y,
                ArithOp::Mul => x * y,
                ArithOp::Div => x / y,
            }))
        }
        Node::Neg(a) => match eval(a, item, curry)? {
            Val::Int(i) => i.checked_neg().map(Val::Int),
            Val::Float(f) => Some(Val::Float(-f)),
            _ => None,
        },
        Node::Not(a) => match eval(a, item, curry)? {
            Val::Bool(b) => Some(Val::Bool(!b)),
            _ => None,
        },
        Node::And(list) => {
            for x in list {
                match eval(x, item, curry)? {
                    Val::Bool(true) => {}
                    Val::Bool(false) => return Some(Val::Bool(false)),
                    _ => return None,
                }
            }
            Some(Val::Bool(true))
        }
        Node::Or(list) => {
            for x in list {
                match eval(x, item, curry)? {
                    Val::Bool(false) => {}
                    Val::Bool(true) => return Some(Val::Bool(true)),
                    _ => return None,
                }
            }
            Some(Val::Bool(false))
        }
        Node::Distance(args) => {
            let mut v = [0.0; 4];
            for (slot, a) in v.iter_mut().zip(args.iter()) {
                *slot = as_f(&eval(a, item, curry)?)?;
            }
            Some(Val::Float(great_circle_km(v[0], v[1], v[2], v[3])))
        }
    }
}

/// Great-circle distance in kilometres (haversine, mean Earth radius).
pub fn great_circle_km(lat1: FLOAT, lon1: FLOAT, lat2: FLOAT, lon2: FLOAT) -> FLOAT {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0088 * a.sqrt().min(1.0).asin()
}
