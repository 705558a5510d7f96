//! Static size bounds for fleet templates: before any device is rendered, every value a template
//! can build and everything it can print is given an upper bound in bytes, and a template that
//! could exceed [`MAX_TEMPLATE_BYTES`] (`"x" * 50000000`, doubling by concatenation, a loop that
//! grows a namespace) is refused with its field. Pure: no I/O.
//!
//! The analysis over-estimates and never under-estimates. Each value is described by a [`Bound`];
//! a device's name and labels by what validation allows them to be. Loops multiply their body's
//! output by the iteration count, and a value a loop body grows must grow at most linearly, or the
//! template is refused. What cannot be bounded (an unknown filter, `debug()`, a recursive loop) is
//! refused too: the fuel limit bounds the steps of a render, this bounds its memory.

use minijinja::machinery::{WhitespaceConfig, ast, parse};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Value, ValueKind};
use std::collections::BTreeMap;

/// The largest value or output a template may build: the largest spec there can be.
pub const MAX_TEMPLATE_BYTES: u64 = crate::spec::MAX_SPEC_BYTES as u64;

/// Unknown: as large as anything.
const UNBOUNDED: u64 = u64::MAX;
/// A number whose magnitude is unknown prints as at most this many bytes (a float near f64::MAX).
const NUMBER_BYTES: u64 = 330;
/// A string shown inside a container is quoted and escaped: at most this many bytes per byte.
const ESCAPE: u64 = 10;
/// Bytes a container adds around each item (quotes, separators, brackets).
const ITEM_OVERHEAD: u64 = 8;
/// MiniJinja refuses longer ranges.
const MAX_RANGE: u64 = 100_000;
/// Passes over a loop body to tell linear growth from faster growth.
const MAX_PASSES: usize = 12;

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct SizeError(pub String);

/// An upper bound on a value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Bound {
    /// Bytes of the value printed.
    bytes: u64,
    /// Bytes of the value printed inside a container (strings quoted and escaped there).
    shown: u64,
    /// Items when iterated (characters of a string).
    items: u64,
    /// Magnitude when used as a number (a repetition count).
    int: u64,
    /// May be a string or a sequence: `*` repeats it, `+` and `~` join it.
    text: bool,
    /// Bound on any one item or attribute; `None`: the value itself bounds them.
    elem: Option<Box<Bound>>,
}

fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b)
}

fn mul(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

fn digits(n: u64) -> u64 {
    if n == UNBOUNDED {
        NUMBER_BYTES
    } else {
        u64::from(n.checked_ilog10().unwrap_or(0)) + 2
    }
}

impl Bound {
    fn number(int: u64) -> Bound {
        Bound {
            bytes: digits(int),
            shown: digits(int),
            int,
            ..Bound::default()
        }
    }

    fn boolean() -> Bound {
        Bound::number(1)
    }

    /// A string of any content.
    fn string(bytes: u64) -> Bound {
        Bound {
            bytes,
            shown: add(mul(bytes, ESCAPE), 2),
            items: bytes,
            text: true,
            ..Bound::default()
        }
    }

    /// A string of characters that need no escaping (a validated name or label).
    fn word(bytes: u64) -> Bound {
        Bound {
            shown: add(bytes, 2),
            ..Bound::string(bytes)
        }
    }

    /// A container of `items` items, each within `elem`.
    fn container(items: u64, elem: Bound) -> Bound {
        let bytes = add(mul(items, add(elem.shown, ITEM_OVERHEAD)), 2);
        Bound {
            bytes,
            shown: bytes,
            items,
            int: elem.int,
            text: true,
            elem: Some(Box::new(elem)),
        }
    }

    fn element(&self) -> Bound {
        match &self.elem {
            Some(elem) => (**elem).clone(),
            None => Bound {
                elem: None,
                ..self.clone()
            },
        }
    }

    fn join(&self, other: &Bound) -> Bound {
        let elem = match (&self.elem, &other.elem) {
            (None, None) => None,
            _ => Some(Box::new(self.element().join(&other.element()))),
        };
        Bound {
            bytes: self.bytes.max(other.bytes),
            shown: self.shown.max(other.shown),
            items: self.items.max(other.items),
            int: self.int.max(other.int),
            text: self.text || other.text,
            elem,
        }
    }

    fn exceeds(&self, other: &Bound) -> bool {
        self.bytes > other.bytes || self.items > other.items || self.int > other.int
    }

    /// The value printed as a string, each byte turned into at most `factor` bytes (case mapping
    /// can lengthen a character up to three times; escaping more).
    fn printed(&self, factor: u64) -> Bound {
        let bytes = mul(self.bytes, factor);
        Bound {
            bytes,
            shown: match self.elem {
                None => mul(self.shown, factor),
                Some(_) => add(mul(bytes, ESCAPE), 2),
            },
            items: bytes,
            int: self.int,
            text: true,
            elem: None,
        }
    }

    /// How deeply containers may nest in the value.
    fn depth(&self) -> u64 {
        self.elem.as_ref().map_or(0, |elem| elem.depth() + 1)
    }

    /// What the value may print after `f` is applied to each of its sizes.
    fn scaled(&self, f: impl Fn(u64) -> u64) -> Bound {
        Bound {
            bytes: f(self.bytes),
            shown: f(self.shown),
            items: f(self.items),
            int: self.int,
            text: true,
            elem: self.elem.clone(),
        }
    }
}

/// The bound of a constant.
fn constant(value: &Value) -> Bound {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => Bound::default(),
        ValueKind::Bool => Bound::boolean(),
        ValueKind::Number => {
            let int = value
                .as_i64()
                .map(|n| n.unsigned_abs())
                .or_else(|| {
                    f64::try_from(value.clone())
                        .ok()
                        .filter(|f| f.is_finite() && f.abs() < 1e18)
                        .map(|f| f.abs().ceil() as u64)
                })
                .unwrap_or(UNBOUNDED);
            let bytes = NUMBER_BYTES
                .min(add(value.to_string().len() as u64, 1))
                .max(digits(int));
            Bound {
                bytes,
                shown: bytes,
                ..Bound::number(int)
            }
        }
        ValueKind::String | ValueKind::Bytes => Bound::string(value.to_string().len() as u64),
        _ => match value.try_iter() {
            Ok(items) => {
                let mut count = 0u64;
                let mut elem = Bound::default();
                for item in items {
                    count += 1;
                    elem = elem.join(&constant(&item));
                    if let Ok(child) = value.get_item(&item) {
                        elem = elem.join(&constant(&child));
                    }
                }
                Bound::container(count, elem)
            }
            Err(_) => Bound::string(value.to_string().len() as u64),
        },
    }
}

type Env = BTreeMap<String, Bound>;

/// What a template sees before it runs: a device's name, id and labels (its own and the fleet's
/// defaults) within the limits validation puts on them, and the fleet's name.
fn context() -> Env {
    use crate::names::{MAX_LABELS, MAX_NAME_LEN};
    let word = Bound::word(MAX_NAME_LEN as u64);
    // Keys and values: the device's own labels and the fleet's defaults.
    let labels = Bound::container(2 * MAX_LABELS as u64, word.clone());
    let id = Bound::word(64);
    let device = Bound::container(3, word.join(&id).join(&labels));
    let fleet = Bound::container(1, word.clone());
    Env::from([
        ("device".to_string(), device),
        ("device.id".to_string(), id),
        ("device.name".to_string(), word.clone()),
        ("device.labels".to_string(), labels),
        ("fleet".to_string(), fleet),
        ("fleet.name".to_string(), word),
    ])
}

/// Refuses a template source that could build or print more than [`MAX_TEMPLATE_BYTES`]; syntax
/// errors are left to the compiler, which names them better.
pub(super) fn check(source: &str) -> Result<(), SizeError> {
    output_bound(source).map(|_| ())
}

/// The most a template source can print, if that is within bounds.
fn output_bound(source: &str) -> Result<u64, SizeError> {
    let Ok(ast) = parse(
        source,
        "template",
        SyntaxConfig,
        WhitespaceConfig::default(),
    ) else {
        return Ok(0);
    };
    let mut env = context();
    let output = stmt(&ast, &mut env)?;
    limit(output, "render")
}

fn limit(bytes: u64, what: &str) -> Result<u64, SizeError> {
    if bytes > MAX_TEMPLATE_BYTES {
        let size = if bytes == UNBOUNDED {
            "an unbounded number of".to_string()
        } else {
            format!("up to {bytes}")
        };
        return Err(SizeError(format!(
            "the template could {what} {size} bytes for some device; a template may build at most {MAX_TEMPLATE_BYTES} bytes (check repetitions, concatenations and loops)"
        )));
    }
    Ok(bytes)
}

fn checked(bound: Bound) -> Result<Bound, SizeError> {
    limit(bound.bytes, "build a value of")?;
    Ok(bound)
}

fn refuse<T>(what: impl std::fmt::Display) -> Result<T, SizeError> {
    Err(SizeError(format!(
        "{what} cannot be bounded in size and is not allowed in fleet templates"
    )))
}

fn stmts(body: &[ast::Stmt<'_>], env: &mut Env) -> Result<u64, SizeError> {
    let mut output = 0u64;
    for s in body {
        output = limit(add(output, stmt(s, env)?), "render")?;
    }
    Ok(output)
}

/// The bytes `s` may print; `env` is updated with what it may assign.
fn stmt(s: &ast::Stmt<'_>, env: &mut Env) -> Result<u64, SizeError> {
    use ast::Stmt;
    match s {
        Stmt::Template(t) => stmts(&t.children, env),
        Stmt::EmitExpr(e) => Ok(expr(&e.expr, env)?.bytes),
        Stmt::EmitRaw(r) => Ok(r.raw.len() as u64),
        Stmt::ForLoop(l) => for_loop(l, env),
        Stmt::IfCond(c) => {
            expr(&c.expr, env)?;
            let mut yes = env.clone();
            let mut no = env.clone();
            let output = stmts(&c.true_body, &mut yes)?.max(stmts(&c.false_body, &mut no)?);
            *env = merge(&yes, &no);
            Ok(output)
        }
        Stmt::WithBlock(w) => {
            let mut inner = env.clone();
            for (target, value) in &w.assignments {
                let bound = expr(value, &inner)?;
                assign(target, Some(value), bound, &mut inner)?;
            }
            let output = stmts(&w.body, &mut inner)?;
            widen(env, &inner);
            Ok(output)
        }
        Stmt::Set(set) => {
            let bound = expr(&set.expr, env)?;
            assign(&set.target, Some(&set.expr), bound, env)?;
            Ok(0)
        }
        Stmt::SetBlock(set) => {
            let mut inner = env.clone();
            let mut bound = Bound::string(stmts(&set.body, &mut inner)?);
            widen(env, &inner);
            if let Some(filter) = &set.filter {
                bound = filtered(filter, bound, env)?;
            }
            assign(&set.target, None, bound, env)?;
            Ok(0)
        }
        Stmt::AutoEscape(a) => stmts(&a.body, env),
        Stmt::FilterBlock(f) => {
            let body = Bound::string(stmts(&f.body, env)?);
            Ok(filtered(&f.filter, body, env)?.bytes)
        }
        Stmt::Do(d) => {
            call(&d.call, env)?;
            Ok(0)
        }
    }
}

/// Pointwise the larger of two environments (after the branches of an `if`).
fn merge(a: &Env, b: &Env) -> Env {
    let mut merged = a.clone();
    for (name, bound) in b {
        let joined = match merged.get(name) {
            Some(other) => other.join(bound),
            None => bound.clone(),
        };
        merged.insert(name.clone(), joined);
    }
    merged
}

/// Takes into `env` what an inner scope may have changed of the names `env` knows.
fn widen(env: &mut Env, inner: &Env) {
    for (name, bound) in env.iter_mut() {
        if let Some(changed) = inner.get(name) {
            *bound = bound.join(changed);
        }
    }
}

/// Binds an assignment target: a name, names to unpack, or a namespace attribute (`ns.total`).
/// A namespace's initial attributes are tracked one by one.
fn assign(
    target: &ast::Expr<'_>,
    value: Option<&ast::Expr<'_>>,
    bound: Bound,
    env: &mut Env,
) -> Result<(), SizeError> {
    match target {
        ast::Expr::Var(var) => {
            let attributes = format!("{}.", var.id);
            env.retain(|name, _| !name.starts_with(&attributes));
            if let Some(ast::Expr::Call(call)) = value
                && matches!(&call.expr, ast::Expr::Var(f) if f.id == "namespace")
            {
                for arg in &call.args {
                    if let ast::CallArg::Kwarg(name, value) = arg {
                        let attr = expr(value, env)?;
                        env.insert(format!("{}.{name}", var.id), attr);
                    }
                }
            }
            env.insert(var.id.to_string(), bound);
            Ok(())
        }
        ast::Expr::List(list) => {
            let item = bound.element();
            for target in &list.items {
                assign(target, None, item.clone(), env)?;
            }
            Ok(())
        }
        ast::Expr::GetAttr(attr) => match &attr.expr {
            ast::Expr::Var(var) => {
                env.insert(format!("{}.{}", var.id, attr.name), bound);
                Ok(())
            }
            _ => refuse("assigning to a nested attribute"),
        },
        _ => refuse("this assignment target"),
    }
}

/// A `for` loop: the body's output times the iterations; what the body grows must grow at most
/// linearly per iteration.
fn for_loop(l: &ast::ForLoop<'_>, env: &mut Env) -> Result<u64, SizeError> {
    if l.recursive {
        return refuse("a recursive loop");
    }
    let iterable = expr(&l.iter, env)?;
    let iterations = iterable.items;
    let item = iterable.element();
    let loop_var = Bound::container(4, item.join(&Bound::number(add(iterations, 1))));
    let bind = |state: &mut Env| -> Result<(), SizeError> {
        assign(&l.target, None, item.clone(), state)?;
        state.insert("loop".into(), loop_var.clone());
        Ok(())
    };

    // Iterate the body on bounds until what it changes stops changing, or changes by the same
    // amount twice (linear growth, extrapolated); anything else grows too fast to allow.
    let mut states = vec![env.clone()];
    let mut settled = None;
    for pass in 0..MAX_PASSES.min(usize::try_from(iterations).unwrap_or(usize::MAX)) {
        let mut state = states[pass].clone();
        bind(&mut state)?;
        if let Some(filter) = &l.filter_expr {
            expr(filter, &state)?;
        }
        stmts(&l.body, &mut state)?;
        if state == states[pass] {
            settled = Some(state.clone());
            states.push(state);
            break;
        }
        states.push(state);
        if pass >= 1
            && let Some(extrapolated) = linear(&states, iterations)?
        {
            settled = Some(extrapolated);
            break;
        }
    }
    let last = states.last().cloned().unwrap_or_default();
    let settled = match settled {
        Some(state) => state,
        None if (states.len() as u64) > iterations => last,
        None => return refuse("a value that a loop grows faster than linearly"),
    };
    // The body's output at its largest, once per iteration.
    let mut state = settled.clone();
    bind(&mut state)?;
    let per_iteration = stmts(&l.body, &mut state)?;
    let mut otherwise = env.clone();
    let output = mul(iterations, per_iteration).max(stmts(&l.else_body, &mut otherwise)?);
    widen(env, &settled);
    widen(env, &otherwise);
    limit(output, "render")
}

/// If the last two passes grew every value by the same amount, the state after `iterations`
/// passes at that rate; `None` if they did not.
fn linear(states: &[Env], iterations: u64) -> Result<Option<Env>, SizeError> {
    let n = states.len();
    let (before, previous, last) = (&states[n - 3], &states[n - 2], &states[n - 1]);
    let step = |a: u64, b: u64| b.saturating_sub(a);
    let mut extrapolated = last.clone();
    let remaining = iterations.saturating_sub(n as u64 - 1);
    for (name, bound) in last {
        let zero = Bound::default();
        let p = previous.get(name).unwrap_or(&zero);
        let b = before.get(name).unwrap_or(&zero);
        let first = [
            step(b.bytes, p.bytes),
            step(b.shown, p.shown),
            step(b.items, p.items),
            step(b.int, p.int),
        ];
        let second = [
            step(p.bytes, bound.bytes),
            step(p.shown, bound.shown),
            step(p.items, bound.items),
            step(p.int, bound.int),
        ];
        let deeper = bound.elem != p.elem && bound.element().exceeds(&p.element());
        if first != second || deeper {
            return Ok(None);
        }
        let grown = Bound {
            bytes: add(bound.bytes, mul(second[0], remaining)),
            shown: add(bound.shown, mul(second[1], remaining)),
            items: add(bound.items, mul(second[2], remaining)),
            int: add(bound.int, mul(second[3], remaining)),
            ..bound.clone()
        };
        limit(grown.bytes, "build a value of")?;
        extrapolated.insert(name.clone(), grown);
    }
    Ok(Some(extrapolated))
}

/// The bound of an expression's value.
fn expr(e: &ast::Expr<'_>, env: &Env) -> Result<Bound, SizeError> {
    use ast::Expr;
    let bound = match e {
        Expr::Var(var) => env.get(var.id).cloned().unwrap_or_default(),
        Expr::Const(c) => constant(&c.value),
        Expr::Slice(slice) => {
            for part in [&slice.start, &slice.stop, &slice.step]
                .into_iter()
                .flatten()
            {
                expr(part, env)?;
            }
            expr(&slice.expr, env)?
        }
        Expr::UnaryOp(op) => {
            let value = expr(&op.expr, env)?;
            match op.op {
                ast::UnaryOpKind::Not => Bound::boolean(),
                ast::UnaryOpKind::Neg => Bound::number(value.int),
            }
        }
        Expr::BinOp(op) => binary(op, env)?,
        Expr::Compare(compare) => {
            expr(&compare.expr, env)?;
            for op in &compare.ops {
                expr(&op.expr, env)?;
            }
            Bound::boolean()
        }
        Expr::IfExpr(choice) => {
            expr(&choice.test_expr, env)?;
            let yes = expr(&choice.true_expr, env)?;
            match &choice.false_expr {
                Some(no) => yes.join(&expr(no, env)?),
                None => yes,
            }
        }
        Expr::Filter(_) => filtered(e, Bound::default(), env)?,
        Expr::Test(test) => {
            expr(&test.expr, env)?;
            arguments(&test.args, env)?;
            Bound::boolean()
        }
        Expr::GetAttr(attr) => {
            if let Expr::Var(var) = &attr.expr
                && let Some(tracked) = env.get(&format!("{}.{}", var.id, attr.name))
            {
                return Ok(tracked.clone());
            }
            expr(&attr.expr, env)?.element()
        }
        Expr::GetItem(item) => {
            expr(&item.subscript_expr, env)?;
            expr(&item.expr, env)?.element()
        }
        Expr::Call(c) => call(c, env)?,
        Expr::List(list) => {
            let mut elem = Bound::default();
            for item in &list.items {
                elem = elem.join(&expr(item, env)?);
            }
            Bound::container(list.items.len() as u64, elem)
        }
        Expr::Map(map) => {
            let mut elem = Bound::default();
            for item in map.keys.iter().chain(&map.values) {
                elem = elem.join(&expr(item, env)?);
            }
            Bound::container(map.keys.len() as u64, Bound::container(2, elem))
        }
    };
    checked(bound)
}

fn binary(op: &ast::BinOp<'_>, env: &Env) -> Result<Bound, SizeError> {
    use ast::BinOpKind as Op;
    let left = expr(&op.left, env)?;
    let right = expr(&op.right, env)?;
    let joined_text = |l: &Bound, r: &Bound| Bound {
        bytes: add(l.bytes, r.bytes).max(digits(add(l.int, r.int))),
        shown: add(l.shown, r.shown).max(digits(add(l.int, r.int))),
        items: add(l.items, r.items),
        int: add(l.int, r.int),
        text: l.text || r.text,
        elem: l.join(r).elem,
    };
    Ok(match op.op {
        Op::Eq | Op::Ne | Op::Lt | Op::Lte | Op::Gt | Op::Gte | Op::In => Bound::boolean(),
        Op::ScAnd | Op::ScOr => left.join(&right),
        Op::Add => joined_text(&left, &right),
        Op::Concat => Bound::string(add(left.bytes, right.bytes)),
        Op::Sub => Bound::number(add(left.int, right.int)),
        Op::Rem => Bound::number(left.int.max(right.int)),
        Op::Div | Op::FloorDiv | Op::Pow => Bound::number(UNBOUNDED),
        Op::Mul => {
            let mut product = Bound::number(mul(left.int, right.int));
            if left.text {
                product = product.join(&left.scaled(|n| mul(n, right.int)));
            }
            if right.text {
                product = product.join(&right.scaled(|n| mul(n, left.int)));
            }
            product
        }
    })
}

/// Bounds call arguments; returns them positional first, then keyword arguments by name.
fn arguments(
    args: &[ast::CallArg<'_>],
    env: &Env,
) -> Result<(Vec<Bound>, BTreeMap<String, Bound>), SizeError> {
    let mut positional = Vec::new();
    let mut named = BTreeMap::new();
    for arg in args {
        match arg {
            ast::CallArg::Pos(e) => positional.push(expr(e, env)?),
            ast::CallArg::Kwarg(name, e) => {
                named.insert(name.to_string(), expr(e, env)?);
            }
            ast::CallArg::PosSplat(_) | ast::CallArg::KwargSplat(_) => {
                return refuse("a splatted argument");
            }
        }
    }
    Ok((positional, named))
}

/// A filter (or a chain of them) applied to `input` — or, inside an expression, to the value it
/// filters.
fn filtered(e: &ast::Expr<'_>, input: Bound, env: &Env) -> Result<Bound, SizeError> {
    let ast::Expr::Filter(f) = e else {
        return expr(e, env);
    };
    let value = match &f.expr {
        Some(inner) => filtered(inner, input, env)?,
        None => input,
    };
    let (args, named) = arguments(&f.args, env)?;
    let arg = |i: usize, name: &str| {
        args.get(i)
            .or_else(|| named.get(name))
            .cloned()
            .unwrap_or_default()
    };
    // The value reshaped into items (split, sorted, paired, listed): its printed form grows by
    // the quoting of each item.
    let reshaped = |v: &Bound, items: u64| Bound::container(items, v.element());
    let bound = match f.name {
        "safe" | "trim" | "string" => value.printed(1),
        "lower" | "upper" | "title" | "capitalize" => value.printed(3),
        "reverse" | "first" | "last" | "min" | "max" | "attr" => value.join(&value.element()),
        "sort" | "unique" | "list" | "select" | "reject" | "selectattr" | "rejectattr" | "map" => {
            reshaped(&value, value.items)
        }
        "dictsort" | "items" => Bound::container(value.items, Bound::container(2, value.element())),
        // A string becomes its lines or words: at most one per byte, each within the string.
        "lines" | "split" => Bound::container(value.bytes, value.element()),
        "length" | "count" => Bound::number(value.items),
        "int" | "float" if value.text => Bound::number(UNBOUNDED),
        "int" | "float" | "abs" => Bound::number(value.int),
        "round" => Bound::number(add(value.int, 1)),
        "sum" => Bound::number(mul(value.int, value.items.max(1))),
        "bool" => Bound::boolean(),
        "default" | "d" => value.join(&arg(0, "default_value")),
        "join" => {
            let separator = arg(0, "d");
            Bound::string(add(value.bytes, mul(value.items, separator.bytes)))
        }
        "replace" => {
            let new = arg(1, "new");
            Bound::string(mul(add(value.bytes, 1), add(new.bytes, 1)))
        }
        "indent" => {
            let width = arg(0, "width");
            let pad = width.int.max(width.bytes);
            Bound::string(add(value.bytes, mul(add(value.bytes, 1), pad)))
        }
        "escape" | "e" => value.printed(6),
        "urlencode" => value.printed(4),
        "tojson" | "pprint" => {
            // Every string escaped (`\u001b`), and when pretty, each line (at most one per byte)
            // indented once per level of nesting.
            let indent = arg(0, "indent").int.max(4);
            let per_line = add(mul(indent, value.depth()), 1);
            Bound::string(add(mul(value.shown, 6), mul(value.bytes, per_line)))
        }
        "batch" | "slice" => {
            let fill = arg(1, "fill_with");
            let padding = if fill.bytes == 0 && fill.int == 0 {
                0
            } else {
                mul(arg(0, "count").int, add(fill.bytes, ITEM_OVERHEAD))
            };
            let rows = reshaped(&value, value.items);
            let bytes = add(mul(rows.bytes, 2), padding);
            Bound {
                bytes,
                shown: bytes,
                ..rows
            }
        }
        "groupby" => {
            let rows = reshaped(&value, value.items);
            let bytes = add(mul(rows.bytes, 3), mul(rows.items, 32));
            Bound {
                bytes,
                shown: bytes,
                ..rows
            }
        }
        "chain" | "zip" => {
            let mut all = value.clone();
            for other in &args {
                all = Bound {
                    bytes: add(all.bytes, other.bytes),
                    items: add(all.items, other.items),
                    ..all.join(other)
                };
            }
            reshaped(&all, all.items)
        }
        name => return refuse(format!("the filter `{name}`")),
    };
    checked(bound)
}

/// A function or method call.
fn call(c: &ast::Call<'_>, env: &Env) -> Result<Bound, SizeError> {
    let (args, named) = arguments(&c.args, env)?;
    match &c.expr {
        ast::Expr::Var(f) if f.id == "range" => {
            let largest = args.iter().map(|a| a.int).max().unwrap_or(0);
            let items = largest.min(MAX_RANGE);
            checked(Bound::container(items, Bound::number(largest)))
        }
        ast::Expr::Var(f) if f.id == "namespace" || f.id == "dict" => {
            let mut elem = Bound::default();
            for (name, value) in &named {
                elem = elem.join(value).join(&Bound::string(name.len() as u64));
            }
            for value in &args {
                elem = elem.join(value);
            }
            let items = add(
                named.len() as u64,
                args.iter().map(|a| a.items).sum::<u64>(),
            );
            checked(Bound::container(items, Bound::container(2, elem)))
        }
        ast::Expr::GetAttr(method) => {
            let receiver = expr(&method.expr, env)?;
            let mut bound = match method.name {
                "cycle" => args.iter().fold(Bound::default(), |a, b| a.join(b)),
                "changed" => return Ok(Bound::boolean()),
                "items" | "keys" | "values" | "lower" | "upper" | "strip" | "lstrip" | "rstrip"
                | "title" | "capitalize" | "split" | "splitlines" => receiver,
                "startswith" | "endswith" | "isdigit" | "isalpha" | "isupper" | "islower"
                | "isspace" | "isalnum" => return Ok(Bound::boolean()),
                "count" | "find" => return Ok(Bound::number(receiver.bytes)),
                name => return refuse(format!("the method `{name}`")),
            };
            // Reshaped into a list of items (pairs, words) at worst.
            bound.bytes = add(bound.shown, mul(bound.items, ITEM_OVERHEAD));
            bound.shown = bound.bytes;
            checked(bound)
        }
        ast::Expr::Var(f) => refuse(format!("the function `{}`", f.id)),
        _ => refuse("this call"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Expressions over the device and constants, nested a few levels.
    fn expression() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("device.name".to_string()),
            Just("device.labels.site".to_string()),
            Just("fleet.name".to_string()),
            "[a-z\\\"\\n]{0,6}".prop_map(|s| format!("{s:?}")),
            (0u32..40).prop_map(|n| n.to_string()),
            Just("device.labels".to_string()),
        ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} ~ {b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} + {b})")),
                (inner.clone(), 0u32..30).prop_map(|(a, n)| format!("({a} * {n})")),
                inner.clone().prop_map(|a| format!("({a} | upper)")),
                inner.clone().prop_map(|a| format!("({a} | list)")),
                inner
                    .clone()
                    .prop_map(|a| format!("({a} | string | indent(3))")),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| format!("({a} | string | replace('a', {b}))")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("[{a}, {b}]")),
                inner.clone().prop_map(|a| format!("({a} | join('--'))")),
            ]
        })
    }

    fn template() -> impl Strategy<Value = String> {
        prop_oneof![
            expression().prop_map(|e| format!("{{{{ {e} }}}}")),
            (expression(), expression()).prop_map(|(a, b)| format!(
                "{{% for x in {a} %}}{{{{ x ~ {b} }}}}{{% endfor %}}"
            )),
            (expression(), 0u32..50).prop_map(|(e, n)| format!(
                "{{% set ns = namespace(s='') %}}{{% for i in range({n}) %}}{{% set ns.s = ns.s ~ {e} %}}{{% endfor %}}{{{{ ns.s }}}}"
            )),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever an accepted template renders for a device at the limits fits its bound.
        #[test]
        fn the_bound_is_never_below_the_rendered_size(source in template()) {
            if let Ok(bound) = output_bound(&source) {
                let mut env = minijinja::Environment::new();
                env.set_fuel(Some(1_000_000));
                let labels: BTreeMap<String, String> = (0..64)
                    .map(|i| (format!("k{i:02}{}", "k".repeat(60)), "v".repeat(63)))
                    .chain([("site".to_string(), "s".repeat(63))])
                    .collect();
                let context = minijinja::context! {
                    device => minijinja::context! { id => "0".repeat(36), name => "n".repeat(63), labels => labels },
                    fleet => minijinja::context! { name => "f".repeat(63) },
                };
                if let Ok(rendered) = env.render_str(&source, &context) {
                    prop_assert!(rendered.len() as u64 <= bound, "{} rendered {} bytes, bound {}", source, rendered.len(), bound);
                }
            }
        }
    }

    fn refused(source: &str) -> String {
        match check(source) {
            Err(SizeError(reason)) => reason,
            Ok(()) => panic!("accepted: {source}"),
        }
    }

    #[test]
    fn repetition_and_doubling_are_refused_before_rendering() {
        let reason = refused(r#"{% set a="x"*50000000 %}{{a~a~a~a}}"#);
        assert!(reason.contains("up to 50000000 bytes"), "{reason}");
        let doubling = format!(
            "{{% set a = \"xxxxxxxxxx\" %}}{}{{{{ a }}}}",
            "{% set a = a ~ a %}".repeat(20)
        );
        assert!(refused(&doubling).contains("bytes"));
        refused(r#"{{ "x" * (device.labels.n | int) }}"#);
        refused(r#"{{ device.name * 100000 }}"#);
        refused(r#"{{ [device.name] * 100000 }}"#);
        refused(r#"{{ device.name | replace("", "x" * 20000) }}"#);
        refused(r#"{{ device.name | indent(device.labels.w | int) }}"#);
        refused(r#"{% for i in range(100000) %}{{ device.labels }}{% endfor %}"#);
    }

    #[test]
    fn values_grown_in_loops_must_grow_linearly() {
        let doubling = r#"{% set ns = namespace(s="x") %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"#;
        assert!(refused(doubling).contains("faster than linearly"));
        let quadratic = r#"{% set ns = namespace(a="", b="") %}{% for i in range(1000) %}{% set ns.a = ns.a ~ ns.b %}{% set ns.b = ns.b ~ "xxxxxxxxxx" %}{% endfor %}{{ ns.a }}"#;
        refused(quadratic);
        let too_long = r#"{% set ns = namespace(s="") %}{% for i in range(100000) %}{% set ns.s = ns.s ~ "0123456789012345678901234567890123456789" %}{% endfor %}"#;
        assert!(refused(too_long).contains("bytes"));
        let linear = r#"{% set ns = namespace(s="") %}{% for i in range(1000) %}{% set ns.s = ns.s ~ "x" %}{% endfor %}{{ ns.s }}"#;
        check(linear).unwrap();
    }

    #[test]
    fn everyday_templates_pass() {
        for source in [
            "{{ device.labels.site }}",
            "{{ device.name | upper }}.{{ fleet.name }}",
            "{% for k, v in device.labels | items %}{{ k }}={{ v }}\n{% endfor %}",
            "{% for i in range(16) %}worker {{ loop.index }} of {{ device.name }}\n{% endfor %}",
            "{{ (device.labels.port | int) + 1 }}",
            "{{ (device.labels.a | int) * (device.labels.b | int) }}",
            "{{ '-' * 72 }}",
            "{% if device.labels.role == 'gw' %}gateway{% else %}node{% endif %}",
            "{{ device.labels.site | default('lab') | replace('-', '_') }}",
            "{% set hosts = ['a', 'b', 'c'] %}{{ hosts | join(',') }}",
            "{% filter upper %}{{ device.name }}{% endfilter %}",
            "{% set body %}{{ device.name }}{% endset %}{{ body | indent(4) }}",
        ] {
            check(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        }
    }

    #[test]
    fn what_cannot_be_bounded_is_refused_by_name() {
        assert!(refused("{{ debug() }}").contains("`debug`"));
        assert!(refused("{{ device.name | frobnicate }}").contains("`frobnicate`"));
        assert!(
            refused("{% for x in device.labels recursive %}{{ loop(x) }}{% endfor %}")
                .contains("recursive")
        );
    }

    #[test]
    fn accepted_templates_render_within_the_bound() {
        let env = minijinja::Environment::new();
        let labels: BTreeMap<String, String> = (0..64)
            .map(|i| (format!("key-{i:02}-{}", "k".repeat(50)), "v".repeat(63)))
            .collect();
        let context = minijinja::context! {
            device => minijinja::context! { id => "0".repeat(36), name => "n".repeat(63), labels => labels },
            fleet => minijinja::context! { name => "f".repeat(63) },
        };
        for source in [
            "{% for k, v in device.labels | items %}{{ k }}={{ v }}\n{% endfor %}",
            "{{ device.labels }}{{ device.labels | items | list }}",
            "{% set ns = namespace(s='') %}{% for k in device.labels %}{% set ns.s = ns.s ~ k ~ device.labels[k] %}{% endfor %}{{ ns.s }}",
            "{% for i in range(1000) %}{{ device.name ~ i }}{% endfor %}",
        ] {
            check(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            let rendered = env.render_str(source, &context).unwrap();
            assert!(rendered.len() as u64 <= MAX_TEMPLATE_BYTES, "{source}");
        }
    }
}
