//! Kubernetes-style label selectors (`site=berlin,tier!=canary,region in (eu,us),!legacy`): the one
//! parser used by fleets, `flotctl get -l`, the admin list and watch RPCs and rollout batches. Pure.

use crate::names::{validate_label_key, validate_label_value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// A conjunction of requirements; the empty selector matches every label set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One condition on one label key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key` — the label is present (any value).
    Exists(String),
    /// `!key` — the label is absent.
    NotExists(String),
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` — absent, or present with another value.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)` — absent, or present with a value outside the set.
    NotIn(String, BTreeSet<String>),
}

/// Why a selector does not parse, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {input:?} at character {position}: {reason}")]
pub struct SelectorError {
    /// The selector as given.
    pub input: String,
    /// 0-based character offset where the problem was found.
    pub position: usize,
    /// What was expected there.
    pub reason: String,
}

impl Requirement {
    /// The label key the requirement is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::Exists(k)
            | Requirement::NotExists(k)
            | Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _) => k,
        }
    }

    /// Whether `labels` satisfy the requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(self.key());
        match self {
            Requirement::Exists(_) => value.is_some(),
            Requirement::NotExists(_) => value.is_none(),
            Requirement::Equals(_, v) => value == Some(v),
            Requirement::NotEquals(_, v) => value != Some(v),
            Requirement::In(_, set) => value.is_some_and(|v| set.contains(v)),
            Requirement::NotIn(_, set) => !value.is_some_and(|v| set.contains(v)),
        }
    }
}

impl Selector {
    /// The selector that matches everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// The selector requiring all of `requirements`.
    pub fn new(requirements: Vec<Requirement>) -> Selector {
        Selector { requirements }
    }

    /// Parses the Kubernetes syntax: `a=b,c!=d,e in (f,g),!h`.
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        Parser::new(input).selector()
    }

    /// The requirements, all of which must hold.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether it matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

fn write_set(f: &mut fmt::Formatter<'_>, set: &BTreeSet<String>) -> fmt::Result {
    let values: Vec<&str> = set.iter().map(String::as_str).collect();
    write!(f, "({})", values.join(","))
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::NotExists(k) => write!(f, "!{k}"),
            Requirement::Equals(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, set) => {
                write!(f, "{k} in ")?;
                write_set(f, set)
            }
            Requirement::NotIn(k, set) => {
                write!(f, "{k} notin ")?;
                write_set(f, set)
            }
        }
    }
}

/// The canonical text form, which parses back to an equal selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Equals,
    DoubleEquals,
    NotEquals,
    Bang,
    Open,
    Close,
    Comma,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Equals => "'='".into(),
            Token::DoubleEquals => "'=='".into(),
            Token::NotEquals => "'!='".into(),
            Token::Bang => "'!'".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::Comma => "','".into(),
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<(usize, Token)>,
    next: usize,
    /// Set when the tokenizer met a character no token starts with.
    bad_char: Option<(usize, char)>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        let mut tokens = Vec::new();
        let mut bad_char = None;
        let chars: Vec<char> = input.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let start = i;
            i += 1;
            let token = match c {
                c if c.is_whitespace() => continue,
                ',' => Token::Comma,
                '(' => Token::Open,
                ')' => Token::Close,
                '=' if chars.get(i) == Some(&'=') => {
                    i += 1;
                    Token::DoubleEquals
                }
                '=' => Token::Equals,
                '!' if chars.get(i) == Some(&'=') => {
                    i += 1;
                    Token::NotEquals
                }
                '!' => Token::Bang,
                c if is_word_char(c) => {
                    while chars.get(i).is_some_and(|c| is_word_char(*c)) {
                        i += 1;
                    }
                    Token::Word(chars[start..i].iter().collect())
                }
                other => {
                    bad_char = Some((start, other));
                    break;
                }
            };
            tokens.push((start, token));
        }
        Parser {
            input,
            tokens,
            next: 0,
            bad_char,
        }
    }

    fn error(&self, position: usize, reason: impl Into<String>) -> SelectorError {
        SelectorError {
            input: self.input.to_string(),
            position,
            reason: reason.into(),
        }
    }

    fn end_position(&self) -> usize {
        self.input.chars().count()
    }

    fn peek(&self) -> Option<&(usize, Token)> {
        self.tokens.get(self.next)
    }

    fn take(&mut self) -> Option<(usize, Token)> {
        let token = self.tokens.get(self.next).cloned();
        self.next += 1;
        token
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        if let Some((position, c)) = self.bad_char {
            return Err(self.error(position, format!("unexpected character {c:?}")));
        }
        let mut requirements = Vec::new();
        if self.tokens.is_empty() {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(self.requirement()?);
            match self.take() {
                None => break,
                Some((_, Token::Comma)) => continue,
                Some((position, token)) => {
                    return Err(self.error(
                        position,
                        format!("expected ',' or the end, found {}", token.describe()),
                    ));
                }
            }
        }
        Ok(Selector { requirements })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.take() {
            Some((position, Token::Word(key))) => {
                validate_label_key(&key).map_err(|e| self.error(position, e.to_string()))?;
                Ok(key)
            }
            Some((position, token)) => Err(self.error(
                position,
                format!("expected a label key, found {}", token.describe()),
            )),
            None => Err(self.error(self.end_position(), "expected a label key")),
        }
    }

    /// A value after `=`/`!=`: a word, or empty when the requirement ends there.
    fn value(&mut self, key: &str) -> Result<String, SelectorError> {
        match self.peek().cloned() {
            Some((position, Token::Word(value))) => {
                self.next += 1;
                validate_label_value(key, &value)
                    .map_err(|e| self.error(position, e.to_string()))?;
                Ok(value)
            }
            Some((_, Token::Comma)) | None => Ok(String::new()),
            Some((position, token)) => Err(self.error(
                position,
                format!("expected a value, found {}", token.describe()),
            )),
        }
    }

    fn set(&mut self, key: &str) -> Result<BTreeSet<String>, SelectorError> {
        match self.take() {
            Some((_, Token::Open)) => {}
            Some((position, token)) => {
                return Err(self.error(
                    position,
                    format!("expected '(', found {}", token.describe()),
                ));
            }
            None => return Err(self.error(self.end_position(), "expected '('")),
        }
        let mut values = BTreeSet::new();
        loop {
            match self.take() {
                Some((position, Token::Word(value))) => {
                    validate_label_value(key, &value)
                        .map_err(|e| self.error(position, e.to_string()))?;
                    values.insert(value);
                }
                Some((position, token)) => {
                    return Err(self.error(
                        position,
                        format!("expected a value, found {}", token.describe()),
                    ));
                }
                None => return Err(self.error(self.end_position(), "expected a value and ')'")),
            }
            match self.take() {
                Some((_, Token::Comma)) => continue,
                Some((_, Token::Close)) => return Ok(values),
                Some((position, token)) => {
                    return Err(self.error(
                        position,
                        format!("expected ',' or ')', found {}", token.describe()),
                    ));
                }
                None => return Err(self.error(self.end_position(), "expected ')'")),
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if let Some((_, Token::Bang)) = self.peek() {
            self.take();
            return Ok(Requirement::NotExists(self.key()?));
        }
        let key = self.key()?;
        let operator = match self.peek() {
            None | Some((_, Token::Comma)) => return Ok(Requirement::Exists(key)),
            Some(_) => self.take(),
        };
        match operator {
            Some((_, Token::Equals | Token::DoubleEquals)) => {
                let value = self.value(&key)?;
                Ok(Requirement::Equals(key, value))
            }
            Some((_, Token::NotEquals)) => {
                let value = self.value(&key)?;
                Ok(Requirement::NotEquals(key, value))
            }
            Some((_, Token::Word(word))) if word == "in" => {
                let set = self.set(&key)?;
                Ok(Requirement::In(key, set))
            }
            Some((_, Token::Word(word))) if word == "notin" => {
                let set = self.set(&key)?;
                Ok(Requirement::NotIn(key, set))
            }
            Some((position, token)) => Err(self.error(
                position,
                format!(
                    "expected '=', '==', '!=', 'in' or 'notin' after {key:?}, found {}",
                    token.describe()
                ),
            )),
            None => Err(self.error(self.end_position(), "expected an operator")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_operator() {
        let s = Selector::parse("site=berlin, tier != canary,region in (eu, us),!legacy,gpu,a==b")
            .unwrap();
        assert_eq!(
            s.to_string(),
            "site=berlin,tier!=canary,region in (eu,us),!legacy,gpu,a=b"
        );
        let device = labels(&[
            ("site", "berlin"),
            ("region", "eu"),
            ("gpu", ""),
            ("a", "b"),
        ]);
        assert!(s.matches(&device));
        let mut canary = device.clone();
        canary.insert("tier".into(), "canary".into());
        assert!(!s.matches(&canary));
        let mut legacy = device.clone();
        legacy.insert("legacy".into(), "yes".into());
        assert!(!s.matches(&legacy));
        assert!(
            Selector::parse("region notin (eu)")
                .unwrap()
                .matches(&labels(&[]))
        );
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
        assert!(Selector::parse("  ").unwrap().is_empty());
        assert!(
            Selector::parse("site=")
                .unwrap()
                .matches(&labels(&[("site", "")]))
        );
    }

    #[test]
    fn bad_selectors_say_where_and_why() {
        for (input, position, fragment) in [
            ("site=berlin,", 12, "expected a label key"),
            ("site in eu", 8, "expected '('"),
            ("site in (eu", 11, "expected ')'"),
            ("site in ()", 9, "expected a value"),
            ("site > 3", 5, "unexpected character '>'"),
            ("site=a b", 7, "expected ',' or the end"),
            ("=x", 0, "expected a label key"),
            ("-bad=x", 0, "label key"),
            ("site=-x", 5, "label value"),
            (
                "site berlin",
                5,
                "expected '=', '==', '!=', 'in' or 'notin'",
            ),
        ] {
            let error = Selector::parse(input).unwrap_err();
            assert_eq!(error.position, position, "{input}: {error}");
            assert!(error.to_string().contains(fragment), "{input}: {error}");
        }
    }

    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["site", "tier", "region", "example.com/role", "a"])
            .prop_map(str::to_string)
    }

    fn value() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["berlin", "eu", "us", "x-1", "v.2"]).prop_map(str::to_string)
    }

    fn set() -> impl Strategy<Value = BTreeSet<String>> {
        prop::collection::btree_set(value(), 1..4)
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        prop_oneof![
            key().prop_map(Requirement::Exists),
            key().prop_map(Requirement::NotExists),
            (key(), value()).prop_map(|(k, v)| Requirement::Equals(k, v)),
            (key(), value()).prop_map(|(k, v)| Requirement::NotEquals(k, v)),
            (key(), set()).prop_map(|(k, s)| Requirement::In(k, s)),
            (key(), set()).prop_map(|(k, s)| Requirement::NotIn(k, s)),
        ]
    }

    /// The obvious reading of a requirement list, written independently of `Requirement::matches`.
    fn naive(requirements: &[Requirement], labels: &BTreeMap<String, String>) -> bool {
        requirements.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::Equals(k, v) => labels.get(k).map(String::as_str) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => labels.get(k).map(String::as_str) != Some(v.as_str()),
            Requirement::In(k, s) => labels.get(k).is_some_and(|x| s.iter().any(|v| v == x)),
            Requirement::NotIn(k, s) => labels.get(k).is_none_or(|x| s.iter().all(|v| v != x)),
        })
    }

    /// Renders a requirement with arbitrary spacing and the alternative `==` spelling.
    fn spelled(r: &Requirement, space: &str, double: bool) -> String {
        let join = |s: &BTreeSet<String>| {
            s.iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(&format!("{space},{space}"))
        };
        match r {
            Requirement::Exists(k) => format!("{space}{k}{space}"),
            Requirement::NotExists(k) => format!("{space}!{space}{k}"),
            Requirement::Equals(k, v) if double => format!("{k}{space}=={space}{v}"),
            Requirement::Equals(k, v) => format!("{k}{space}={space}{v}"),
            Requirement::NotEquals(k, v) => format!("{k}{space}!={space}{v}"),
            Requirement::In(k, s) => format!("{k} in{space}({space}{}{space})", join(s)),
            Requirement::NotIn(k, s) => format!("{k} notin{space}({}){space}", join(s)),
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(input in "\\PC{0,40}") {
            let _ = Selector::parse(&input);
        }

        #[test]
        fn never_panics_on_selector_like_input(input in "[a-z!=(), ]{0,30}") {
            if let Ok(selector) = Selector::parse(&input) {
                // Whatever parses prints back to something that parses to the same selector.
                prop_assert_eq!(Selector::parse(&selector.to_string()).unwrap(), selector);
            }
        }

        #[test]
        fn agrees_with_a_straightforward_evaluator(
            requirements in prop::collection::vec(requirement(), 0..5),
            device in prop::collection::btree_map(key(), value(), 0..5),
            space in prop::sample::select(vec!["", " ", "  "]),
            double in any::<bool>(),
        ) {
            let text: Vec<String> = requirements.iter().map(|r| spelled(r, space, double)).collect();
            let parsed = Selector::parse(&text.join(",")).unwrap();
            prop_assert_eq!(parsed.requirements(), requirements.as_slice());
            prop_assert_eq!(parsed.matches(&device), naive(&requirements, &device));
        }
    }
}
