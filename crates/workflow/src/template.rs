//! Prompt templates (`{{ inputs.topic }}`, `{{ steps.research.output }}`, `{{ item }}`)
//! and `when` conditions (`steps.approve.outcome == approved`).
//!
//! Both are parsed once, when the spec is validated, so that a typo in a reference is
//! a spec error with a line number rather than a surprise halfway through a run.
//! Rendering cannot fail: every reference was checked against the spec, and a
//! reference to a skipped step renders as the empty string.

use std::borrow::Cow;
use std::fmt;

/// What a `{{ … }}` placeholder or the left side of a condition reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ref {
    /// `inputs.<name>`: a run input (its value, or the spec's default).
    Input(String),
    /// `steps.<id>.output`: the step's reply text (a map step: a JSON array of its
    /// items' replies; an approval: the reviewer's reason).
    Output(String),
    /// `steps.<id>.output_lines`: the non-empty lines of that output (trimmed), one per
    /// line; as a map's `over`, one item per line.
    OutputLines(String),
    /// `steps.<id>.outcome`: `succeeded`, `skipped`, `approved` or `rejected`.
    Outcome(String),
    /// `item`: the current map item (map steps' prompts only).
    Item,
    /// `index`: the current map item's 0-based index (map steps' prompts only).
    Index,
}

impl Ref {
    /// The step this reference reads, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Ref::Output(s) | Ref::OutputLines(s) | Ref::Outcome(s) => Some(s),
            Ref::Input(_) | Ref::Item | Ref::Index => None,
        }
    }

    fn parse(expr: &str) -> Result<Self, TemplateError> {
        let bad = || TemplateError::BadReference {
            expr: expr.to_owned(),
        };
        let parts: Vec<&str> = expr.split('.').collect();
        match parts.as_slice() {
            ["item"] => Ok(Ref::Item),
            ["index"] => Ok(Ref::Index),
            ["inputs", name] if !name.is_empty() => Ok(Ref::Input((*name).to_owned())),
            ["steps", id, field] if !id.is_empty() => {
                let id = (*id).to_owned();
                match *field {
                    "output" => Ok(Ref::Output(id)),
                    "output_lines" => Ok(Ref::OutputLines(id)),
                    "outcome" => Ok(Ref::Outcome(id)),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ref::Input(n) => write!(f, "inputs.{n}"),
            Ref::Output(s) => write!(f, "steps.{s}.output"),
            Ref::OutputLines(s) => write!(f, "steps.{s}.output_lines"),
            Ref::Outcome(s) => write!(f, "steps.{s}.outcome"),
            Ref::Item => f.write_str("item"),
            Ref::Index => f.write_str("index"),
        }
    }
}

/// Why a template or condition did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` without its `}}`.
    #[error("`{{{{` at byte {offset} is never closed with `}}}}`")]
    Unclosed { offset: usize },
    /// Something inside `{{ }}` that is not one of the known references.
    #[error(
        "unknown reference `{expr}` (use inputs.<name>, steps.<id>.output, steps.<id>.output_lines, steps.<id>.outcome, item or index)"
    )]
    BadReference { expr: String },
    /// A condition that is not `<ref> <op> <value>`.
    #[error(
        "condition {text:?}: {why} (write e.g. `steps.review.output contains 'LGTM'`, `steps.approve.outcome == approved`; operators: contains, not contains, ==, !=)"
    )]
    BadCondition { text: String, why: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Ref(Ref),
}

/// A parsed template: text with `{{ ref }}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; every `{{ … }}` must hold a known reference.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(TemplateError::Unclosed {
                    offset: offset + open,
                });
            };
            parts.push(Part::Ref(Ref::parse(after[..close].trim())?));
            let consumed = open + 2 + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self {
            source: text.to_owned(),
            parts,
        })
    }

    /// The text as written in the spec.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every reference, in order.
    pub fn refs(&self) -> impl Iterator<Item = &Ref> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Text(_) => None,
        })
    }

    /// The template is exactly one placeholder and nothing else (whitespace aside).
    pub fn sole_ref(&self) -> Option<&Ref> {
        let mut found = None;
        for p in &self.parts {
            match p {
                Part::Ref(r) if found.is_none() => found = Some(r),
                Part::Text(t) if t.trim().is_empty() => {}
                _ => return None,
            }
        }
        found
    }

    /// Substitutes every placeholder with what `lookup` says it reads.
    pub fn render<'s>(&self, lookup: impl Fn(&Ref) -> Cow<'s, str>) -> String {
        let mut out = String::with_capacity(self.source.len());
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Ref(r) => out.push_str(&lookup(r)),
            }
        }
        out
    }
}

/// How a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondOp {
    Contains,
    NotContains,
    Eq,
    Ne,
}

/// A parsed `when`: `<ref> <op> <value>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    source: String,
    /// What is compared: `steps.X.output`, `steps.X.outcome` or `inputs.X`.
    pub left: Ref,
    pub op: CondOp,
    /// The literal compared against (quotes removed).
    pub value: String,
}

impl Condition {
    /// Parses `steps.X.output contains 'text'`, `… not contains …`, `… == …`, `… != …`.
    /// The value is quoted (`'…'` or `"…"`) or a single bare word.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let bad = |why| TemplateError::BadCondition {
            text: text.to_owned(),
            why,
        };
        let t = text.trim();
        let end = t
            .find(|c: char| c.is_whitespace() || c == '=' || c == '!')
            .ok_or_else(|| bad("no operator"))?;
        let left = Ref::parse(&t[..end]).map_err(|_| bad("the left side is not a reference"))?;
        if !matches!(left, Ref::Output(_) | Ref::Outcome(_) | Ref::Input(_)) {
            return Err(bad(
                "the left side must be steps.<id>.output, steps.<id>.outcome or inputs.<name>",
            ));
        }
        let rest = t[end..].trim_start();
        fn word_op<'r>(rest: &'r str, word: &str) -> Option<&'r str> {
            rest.strip_prefix(word)
                .filter(|r| r.starts_with(|c: char| c.is_whitespace() || c == '\'' || c == '"'))
        }
        let (op, rest) = if let Some(r) = rest.strip_prefix("==") {
            (CondOp::Eq, r)
        } else if let Some(r) = rest.strip_prefix("!=") {
            (CondOp::Ne, r)
        } else if let Some(r) = word_op(rest, "contains") {
            (CondOp::Contains, r)
        } else if let Some(r) = rest
            .strip_prefix("not")
            .map(str::trim_start)
            .and_then(|r| word_op(r, "contains"))
        {
            (CondOp::NotContains, r)
        } else {
            return Err(bad("no operator"));
        };
        let v = rest.trim();
        let value = match v.chars().next() {
            None => return Err(bad("no value after the operator")),
            Some(q @ ('\'' | '"')) => {
                if v.len() < 2 || !v.ends_with(q) {
                    return Err(bad("unterminated quote"));
                }
                v[1..v.len() - 1].to_owned()
            }
            Some(_) if v.contains(char::is_whitespace) => {
                return Err(bad("a value with spaces must be quoted"));
            }
            Some(_) => v.to_owned(),
        };
        Ok(Self {
            source: text.to_owned(),
            left,
            op,
            value,
        })
    }

    /// The condition as written in the spec.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Compares `actual` (what [`Condition::left`] reads) with the value.
    pub fn eval(&self, actual: &str) -> bool {
        match self.op {
            CondOp::Contains => actual.contains(&self.value),
            CondOp::NotContains => !actual.contains(&self.value),
            CondOp::Eq => actual == self.value,
            CondOp::Ne => actual != self.value,
        }
    }
}

/// The non-empty lines of `text`, trimmed.
pub fn output_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn render(t: &Template) -> String {
        t.render(|r| match r {
            Ref::Input(n) => Cow::Owned(format!("<{n}>")),
            Ref::Output(s) => Cow::Owned(format!("[{s}]")),
            other => Cow::Owned(other.to_string()),
        })
    }

    #[test]
    fn renders_placeholders() {
        let t = Template::parse("Research {{ inputs.topic }} from {{steps.a.output}}!").unwrap();
        assert_eq!(render(&t), "Research <topic> from [a]!");
        assert_eq!(
            t.refs().cloned().collect::<Vec<_>>(),
            vec![Ref::Input("topic".into()), Ref::Output("a".into())]
        );
        let plain = Template::parse("no placeholders } {").unwrap();
        assert_eq!(render(&plain), "no placeholders } {");
        assert_eq!(
            render(&Template::parse("{{ item }}-{{ index }}").unwrap()),
            "item-index"
        );
    }

    #[test]
    fn refuses_bad_templates() {
        assert_eq!(
            Template::parse("abc {{ inputs.x").unwrap_err(),
            TemplateError::Unclosed { offset: 4 }
        );
        for bad in [
            "{{ }}",
            "{{ steps.a }}",
            "{{ steps.a.nope }}",
            "{{ foo }}",
            "{{ inputs. }}",
        ] {
            assert!(
                matches!(
                    Template::parse(bad),
                    Err(TemplateError::BadReference { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn sole_ref() {
        let t = Template::parse(" {{ steps.list.output_lines }} ").unwrap();
        assert_eq!(t.sole_ref(), Some(&Ref::OutputLines("list".into())));
        assert_eq!(Template::parse("x {{ item }}").unwrap().sole_ref(), None);
    }

    #[test]
    fn conditions() {
        let c = Condition::parse("steps.approve.outcome == approved").unwrap();
        assert_eq!(
            (c.left.clone(), c.op, c.value.as_str()),
            (Ref::Outcome("approve".into()), CondOp::Eq, "approved")
        );
        assert!(c.eval("approved") && !c.eval("rejected"));
        let c = Condition::parse("steps.r.output contains 'LGTM now'").unwrap();
        assert!(c.eval("well, LGTM now!"));
        let c = Condition::parse("steps.r.output not contains \"TODO\"").unwrap();
        assert!(c.eval("done") && !c.eval("a TODO"));
        let c = Condition::parse("inputs.mode!=fast").unwrap();
        assert_eq!(c.op, CondOp::Ne);
        for bad in [
            "steps.r.output",
            "steps.r.output ~= x",
            "steps.r.output == 'x",
            "steps.r.output == two words",
            "steps.r.output ==",
            "item == x",
            "steps.r.output containsx 'a'",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines() {
        assert_eq!(output_lines("a.md\n\n  b.md \r\n"), vec!["a.md", "b.md"]);
    }
}
