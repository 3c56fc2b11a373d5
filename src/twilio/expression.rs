//! TaskRouter filter expressions (`transferTargetType == 'worker'`, `IN [...]`, `AND`/`OR`, quotes either way): parsed, and evaluated against a transfer task with three-valued logic.

use std::collections::BTreeMap;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, Op, Operand),
    /// A lone operand used as a condition (`true`, `1`, `isTransfer`).
    Truthy(Operand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Contains,
    Has,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    List(Vec<Operand>),
    /// A task attribute, possibly dotted (`conversations.conversation_id`).
    Attr(String),
}

/// What an attribute is known to be on the task being judged.
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    Str(String),
    Bool(bool),
    /// Present, value not known (a worker SID, a queue name).
    Some,
    /// Not set on the task.
    Absent,
}

/// Kleene's three values: an expression over attributes whose values are not known may be
/// neither true nor false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn of(b: bool) -> Truth {
        if b { Truth::True } else { Truth::False }
    }

    fn and(self, o: Truth) -> Truth {
        match (self, o) {
            (Truth::False, _) | (_, Truth::False) => Truth::False,
            (Truth::True, Truth::True) => Truth::True,
            _ => Truth::Unknown,
        }
    }

    fn or(self, o: Truth) -> Truth {
        match (self, o) {
            (Truth::True, _) | (_, Truth::True) => Truth::True,
            (Truth::False, Truth::False) => Truth::False,
            _ => Truth::Unknown,
        }
    }

    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Str(String),
    Num(f64),
    Word(String),
    Sym(&'static str),
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' || c == '"' {
            let end = chars[i + 1..]
                .iter()
                .position(|d| *d == c)
                .ok_or_else(|| format!("unterminated string starting at character {}", i + 1))?;
            out.push(Token::Str(chars[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
        } else if c.is_ascii_digit()
            || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Token::Num(
                text.parse()
                    .map_err(|_| format!("{text:?} is not a number"))?,
            ));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '-'))
            {
                i += 1;
            }
            out.push(Token::Word(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let sym = ["==", "!=", ">=", "<=", "&&", "||"]
                .into_iter()
                .find(|s| *s == two)
                .or_else(|| {
                    ["(", ")", "[", "]", ",", ">", "<", "=", "!"]
                        .into_iter()
                        .find(|s| s.starts_with(c))
                })
                .ok_or_else(|| format!("unexpected {c:?} at character {}", i + 1))?;
            i += sym.len();
            out.push(Token::Sym(sym));
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Token::Sym(x)) if *x == s)
    }

    fn expect(&mut self, s: &str) -> Result<(), String> {
        if self.sym(s) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {s:?} {}", self.here()))
        }
    }

    fn here(&self) -> String {
        match self.peek() {
            None => "at the end".into(),
            Some(t) => format!("before {t:?}"),
        }
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.word("or") || self.sym("||") {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.word("and") || self.sym("&&") {
            self.at += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if (self.word("not") && !self.next_is_in()) || self.sym("!") {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }

    fn next_is_in(&self) -> bool {
        matches!(self.tokens.get(self.at + 1), Some(Token::Word(w)) if w.eq_ignore_ascii_case("in"))
    }

    fn cmp(&mut self) -> Result<Expr, String> {
        if self.sym("(") {
            // A parenthesised expression, unless it turns out to be an operand compared
            // with something (TaskRouter has no such operands; lists use brackets).
            self.at += 1;
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Token::Sym("==" | "=")) => Op::Eq,
            Some(Token::Sym("!=")) => Op::Ne,
            Some(Token::Sym(">=")) => Op::Ge,
            Some(Token::Sym("<=")) => Op::Le,
            Some(Token::Sym(">")) => Op::Gt,
            Some(Token::Sym("<")) => Op::Lt,
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("in") => Op::In,
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("contains") => Op::Contains,
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("has") => Op::Has,
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("not") && self.next_is_in() => {
                self.at += 1;
                Op::NotIn
            }
            _ => return Ok(Expr::Truthy(left)),
        };
        self.at += 1;
        Ok(Expr::Cmp(left, op, self.operand()?))
    }

    fn operand(&mut self) -> Result<Operand, String> {
        let t = self
            .peek()
            .cloned()
            .ok_or_else(|| "expected a value at the end".to_string())?;
        self.at += 1;
        Ok(match t {
            Token::Str(s) => Operand::Str(s),
            Token::Num(n) => Operand::Num(n),
            Token::Word(w) if w.eq_ignore_ascii_case("true") => Operand::Bool(true),
            Token::Word(w) if w.eq_ignore_ascii_case("false") => Operand::Bool(false),
            Token::Word(w) if w.eq_ignore_ascii_case("null") => Operand::Null,
            Token::Word(w) => Operand::Attr(w),
            Token::Sym("[") => {
                let mut items = Vec::new();
                while !self.sym("]") {
                    items.push(self.operand()?);
                    if !self.sym("]") {
                        self.expect(",")?;
                    }
                }
                self.at += 1;
                Operand::List(items)
            }
            Token::Sym(s) => {
                self.at -= 1;
                return Err(format!("expected a value, found {s:?}"));
            }
        })
    }
}

/// Parses a TaskRouter filter expression.
pub fn parse(expression: &str) -> Result<Expr, String> {
    let mut p = Parser {
        tokens: tokens(expression)?,
        at: 0,
    };
    if p.tokens.is_empty() {
        return Err("the expression is empty".into());
    }
    let e = p.or()?;
    if p.at != p.tokens.len() {
        return Err(format!("unexpected {}", p.here()));
    }
    Ok(e)
}

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Str(String),
    Num(f64),
    Bool(bool),
    List(Vec<V>),
    Null,
    /// An attribute whose value is not known.
    Unknown,
}

fn value(o: &Operand, task: &BTreeMap<&str, Known>) -> V {
    match o {
        Operand::Str(s) => V::Str(s.clone()),
        Operand::Num(n) => V::Num(*n),
        Operand::Bool(b) => V::Bool(*b),
        Operand::Null => V::Null,
        Operand::List(items) => V::List(items.iter().map(|i| value(i, task)).collect()),
        // `task.x` in worker expressions names the same attribute as `x` in a filter.
        Operand::Attr(a) => match task.get(a.strip_prefix("task.").unwrap_or(a)) {
            Some(Known::Str(s)) => V::Str(s.clone()),
            Some(Known::Bool(b)) => V::Bool(*b),
            Some(Known::Absent) => V::Null,
            Some(Known::Some) | None => V::Unknown,
        },
    }
}

fn compare(l: &V, op: Op, r: &V) -> Truth {
    if matches!(l, V::Unknown) || matches!(r, V::Unknown) {
        return Truth::Unknown;
    }
    let member = |x: &V, list: &V| match list {
        V::List(items) if items.contains(&V::Unknown) && !items.contains(x) => Truth::Unknown,
        V::List(items) => Truth::of(items.contains(x)),
        _ => Truth::False,
    };
    let order = |f: fn(std::cmp::Ordering) -> bool| match (l, r) {
        (V::Num(a), V::Num(b)) => a.partial_cmp(b).map_or(Truth::False, |o| Truth::of(f(o))),
        (V::Str(a), V::Str(b)) => Truth::of(f(a.cmp(b))),
        _ => Truth::False,
    };
    match op {
        Op::Eq => Truth::of(l == r),
        // A missing attribute matches no comparison in TaskRouter, `!=` included.
        Op::Ne if matches!(l, V::Null) || matches!(r, V::Null) => Truth::False,
        Op::Ne => Truth::of(l != r),
        Op::Lt => order(|o| o.is_lt()),
        Op::Le => order(|o| o.is_le()),
        Op::Gt => order(|o| o.is_gt()),
        Op::Ge => order(|o| o.is_ge()),
        Op::In => member(l, r),
        Op::NotIn if matches!(l, V::Null) => Truth::False,
        Op::NotIn => member(l, r).not(),
        Op::Has => member(r, l),
        Op::Contains => match (l, r) {
            (V::Str(a), V::Str(b)) => Truth::of(a.contains(b.as_str())),
            _ => member(r, l),
        },
    }
}

/// Whether `e` holds for a task with these attributes (any other attribute's value unknown).
pub fn eval(e: &Expr, task: &BTreeMap<&str, Known>) -> Truth {
    match e {
        Expr::Or(a, b) => eval(a, task).or(eval(b, task)),
        Expr::And(a, b) => eval(a, task).and(eval(b, task)),
        Expr::Not(a) => eval(a, task).not(),
        Expr::Cmp(l, op, r) => compare(&value(l, task), *op, &value(r, task)),
        Expr::Truthy(o) => match value(o, task) {
            V::Bool(b) => Truth::of(b),
            V::Num(n) => Truth::of(n != 0.0),
            V::Str(s) => Truth::of(!s.is_empty()),
            V::Null => Truth::False,
            V::List(_) | V::Unknown => Truth::Unknown,
        },
    }
}

/// What a task's JSON attributes say of each attribute (for a task whose attributes are all
/// known, as the simulated Twilio has them).
pub fn known(attributes: &serde_json::Value) -> BTreeMap<&str, Known> {
    use serde_json::Value;
    attributes
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let known = match v {
                Value::String(s) => Known::Str(s.clone()),
                Value::Bool(b) => Known::Bool(*b),
                Value::Null => Known::Absent,
                _ => Known::Some,
            };
            (k.as_str(), known)
        })
        .collect()
}

/// The attributes the template's `create-transfer-task` function sets on a transfer task of
/// `target_type` (`worker` or `queue`).
pub fn transfer_task(target_type: &str) -> BTreeMap<&'static str, Known> {
    let queue = target_type == "queue";
    BTreeMap::from([
        ("transferTargetType", Known::Str(target_type.to_string())),
        ("transferTargetSid", Known::Some),
        (
            "transferQueueName",
            if queue { Known::Some } else { Known::Absent },
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(expression: &str, target: &str) -> Truth {
        eval(&parse(expression).unwrap(), &transfer_task(target))
    }

    #[test]
    fn the_templates_expressions_route_their_type_and_not_the_other() {
        assert_eq!(
            routes("transferTargetType == 'worker'", "worker"),
            Truth::True
        );
        assert_eq!(
            routes("transferTargetType == 'worker'", "queue"),
            Truth::False
        );
        assert_eq!(
            routes("transferTargetType == 'queue'", "queue"),
            Truth::True
        );
    }

    #[test]
    fn either_way_round_either_quotes_any_spacing() {
        for e in [
            "'worker' == transferTargetType",
            "transferTargetType==\"worker\"",
            "  transferTargetType   ==   'worker'  ",
            "task.transferTargetType == 'worker'",
            "transferTargetType = 'worker'",
        ] {
            assert_eq!(routes(e, "worker"), Truth::True, "{e}");
            assert_eq!(routes(e, "queue"), Truth::False, "{e}");
        }
    }

    #[test]
    fn in_lists_and_and_or_route_both_types() {
        for e in [
            "transferTargetType IN ['worker','queue']",
            "transferTargetType in [\"queue\", \"worker\"]",
            "transferTargetType == 'worker' OR transferTargetType == 'queue'",
            "transferTargetType == 'worker' || 'queue' == transferTargetType",
            "(transferTargetType == 'worker') or (transferTargetType == 'queue')",
            "transferTargetType != 'chat'",
            "transferTargetType NOT IN ['voice']",
            "1 == 1",
        ] {
            assert_eq!(routes(e, "worker"), Truth::True, "{e}");
            assert_eq!(routes(e, "queue"), Truth::True, "{e}");
        }
    }

    #[test]
    fn conditions_on_unknown_attributes_are_unknown_not_false() {
        let e = "transferTargetType == 'worker' AND priority > 5";
        assert_eq!(routes(e, "worker"), Truth::Unknown);
        assert_eq!(routes(e, "queue"), Truth::False);
        assert_eq!(
            routes(
                "transferTargetType == 'queue' and transferQueueName != null",
                "worker"
            ),
            Truth::False
        );
    }

    #[test]
    fn malformed_expressions_are_reported() {
        for (e, why) in [
            ("transferTargetType == 'worker", "unterminated string"),
            ("transferTargetType ==", "expected a value"),
            ("transferTargetType IN ['worker' 'queue']", "expected \",\""),
            ("transferTargetType == 'worker' AND", "expected a value"),
            ("(transferTargetType == 'worker'", "expected \")\""),
            ("transferTargetType ~ 'worker'", "unexpected '~'"),
            ("", "empty"),
        ] {
            let err = parse(e).unwrap_err();
            assert!(err.contains(why), "{e:?}: {err}");
        }
    }
}
