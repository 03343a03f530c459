//! The script: what the stand-in answers, turn by turn, and the checks made when it
//! is loaded. A script is checked once, at load, so a mistake in it is reported with
//! its place ("turn 2: tool_use without a name (call 1)") instead of surfacing later
//! as a confusing answer in the middle of a test.

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};

/// The longest `delay_ms` a turn may ask for: ten minutes, the official SDKs' default
/// timeout. Anything longer is almost surely seconds typed as milliseconds.
pub const MAX_DELAY_MS: u64 = 600_000;

/// The text answered past the last turn of a script without `repeat_last`.
pub const NO_MORE_TURNS: &str = "(the script has no more turns)";

/// The script played when none is given (the offline demo): the agent is asked to
/// write `hello.txt`, then says it did. [`default_script`] is the same, parsed.
pub const DEFAULT_SCRIPT: &str = r#"{
  "turns": [
    {"tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": "Hello from your ClawOS agent.\n"}}]},
    {"text": "I wrote hello.txt in the workspace.", "expect_tool_result": true}
  ],
  "repeat_last": false
}
"#;

/// [`DEFAULT_SCRIPT`], built directly (it cannot fail).
pub fn default_script() -> Script {
    let mut input = Map::new();
    input.insert("path".into(), json!("hello.txt"));
    input.insert("content".into(), json!("Hello from your ClawOS agent.\n"));
    Script {
        turns: vec![
            Turn {
                tool_use: vec![ToolCall {
                    name: "write_file".into(),
                    input,
                }],
                ..Turn::default()
            },
            Turn {
                text: Some("I wrote hello.txt in the workspace.".into()),
                expect_tool_result: true,
                ..Turn::default()
            },
        ],
        repeat_last: false,
    }
}

/// One tool call the scripted assistant makes: a `tool_use` content block.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The tool's name: 1-64 letters, digits, `_` or `-`, as the API requires.
    pub name: String,
    /// The arguments; always a JSON object, because the API's `input` is one.
    pub input: Map<String, Value>,
}

/// One scripted assistant answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Turn {
    /// A `text` block, sent first.
    pub text: Option<String>,
    /// `tool_use` blocks, sent after the text; when there are any the answer's
    /// `stop_reason` is `tool_use`, otherwise `end_turn`.
    pub tool_use: Vec<ToolCall>,
    /// Refuse (400) a request whose user turn (the user messages since the last assistant
    /// message) carries no `tool_result` block:
    /// a client whose tool loop is broken fails loudly instead of being answered.
    pub expect_tool_result: bool,
    /// Wait this long before answering (a slow model, a timeout test).
    pub delay: Duration,
}

/// A checked script: at least one turn, every turn answering something.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    turns: Vec<Turn>,
    repeat_last: bool,
}

/// What is wrong with a script. Turns and tool calls are counted from 1, as a person
/// reading the file counts them.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("the script is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the script must be a JSON object like {{\"turns\": [{{\"text\": \"hi\"}}]}}, not {0}")]
    NotAnObject(&'static str),
    #[error("unknown field `{0}` in the script (known: turns, repeat_last)")]
    UnknownField(String),
    #[error("the script has no `turns`")]
    MissingTurns,
    #[error("`turns` must be an array of turns, not {0}")]
    TurnsNotArray(&'static str),
    #[error("the script has no turns: `turns` is empty")]
    NoTurns,
    #[error("`repeat_last` must be true or false, not {0}")]
    RepeatLastNotBool(&'static str),
    #[error("turn {turn}: {problem}")]
    Turn { turn: usize, problem: TurnProblem },
}

/// What is wrong with one turn (see [`ScriptError::Turn`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TurnProblem {
    #[error("must be a JSON object with `text` and/or `tool_use`, not {0}")]
    NotAnObject(&'static str),
    #[error("unknown field `{0}` (known: text, tool_use, expect_tool_result, delay_ms)")]
    UnknownField(String),
    #[error("`text` must be a string, not {0}")]
    TextNotString(&'static str),
    #[error("`text` is empty (the API never sends an empty text block): leave it out")]
    EmptyText,
    #[error("`tool_use` must be an array of {{\"name\": ..., \"input\": {{...}}}}, not {0}")]
    ToolUseNotArray(&'static str),
    #[error("has neither `text` nor `tool_use`: a turn must answer something")]
    Empty,
    #[error(
        "tool_use must be an object {{\"name\": ..., \"input\": {{...}}}}, not {kind} (call {call})"
    )]
    CallNotAnObject { call: usize, kind: &'static str },
    #[error("unknown field `{field}` in tool_use (call {call}; known: name, input)")]
    CallUnknownField { call: usize, field: String },
    #[error("tool_use without a name (call {call})")]
    CallWithoutName { call: usize },
    #[error("tool_use name {name:?} must be 1-64 letters, digits, `_` or `-` (call {call})")]
    BadToolName { call: usize, name: String },
    #[error("tool_use input must be a JSON object, not {kind} (call {call})")]
    InputNotObject { call: usize, kind: &'static str },
    #[error("`expect_tool_result` must be true or false, not {0}")]
    ExpectNotBool(&'static str),
    #[error("`expect_tool_result` can never hold on the first turn: no tool was called before it")]
    ExpectOnFirstTurn,
    #[error("`expect_tool_result` can never hold: the turn before it calls no tool")]
    ExpectAfterNoCall,
    #[error("`delay_ms` must be a whole number of milliseconds up to {MAX_DELAY_MS}, not {0}")]
    BadDelay(String),
}

impl Script {
    /// A script of `turns`, checked as a loaded file is (a turn must answer something,
    /// tool names and inputs must be what the API could send, ...).
    pub fn new(turns: Vec<Turn>, repeat_last: bool) -> Result<Self, ScriptError> {
        if turns.is_empty() {
            return Err(ScriptError::NoTurns);
        }
        for (i, t) in turns.iter().enumerate() {
            let problem = |problem| ScriptError::Turn {
                turn: i + 1,
                problem,
            };
            if t.text.as_deref() == Some("") {
                return Err(problem(TurnProblem::EmptyText));
            }
            if t.text.is_none() && t.tool_use.is_empty() {
                return Err(problem(TurnProblem::Empty));
            }
            for (c, call) in t.tool_use.iter().enumerate() {
                if call.name.is_empty() {
                    return Err(problem(TurnProblem::CallWithoutName { call: c + 1 }));
                }
                if !valid_tool_name(&call.name) {
                    return Err(problem(TurnProblem::BadToolName {
                        call: c + 1,
                        name: call.name.clone(),
                    }));
                }
            }
            if t.delay > Duration::from_millis(MAX_DELAY_MS) {
                return Err(problem(TurnProblem::BadDelay(format!(
                    "{}",
                    t.delay.as_millis()
                ))));
            }
            if t.expect_tool_result {
                match i.checked_sub(1).map(|p| &turns[p]) {
                    None => return Err(problem(TurnProblem::ExpectOnFirstTurn)),
                    Some(prev) if prev.tool_use.is_empty() => {
                        return Err(problem(TurnProblem::ExpectAfterNoCall));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(Self { turns, repeat_last })
    }

    /// Parses and checks a script (the format is in the crate docs).
    pub fn from_json(text: &str) -> Result<Self, ScriptError> {
        let v: Value = serde_json::from_str(text)?;
        let Value::Object(top) = v else {
            return Err(ScriptError::NotAnObject(kind(&v)));
        };
        if let Some(k) = top
            .keys()
            .find(|k| !["turns", "repeat_last"].contains(&k.as_str()))
        {
            return Err(ScriptError::UnknownField(k.clone()));
        }
        let repeat_last = match top.get("repeat_last") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(ScriptError::RepeatLastNotBool(kind(other))),
        };
        let turns = match top.get("turns") {
            None => return Err(ScriptError::MissingTurns),
            Some(Value::Array(ts)) => ts,
            Some(other) => return Err(ScriptError::TurnsNotArray(kind(other))),
        };
        let turns = turns
            .iter()
            .enumerate()
            .map(|(i, t)| {
                parse_turn(t).map_err(|problem| ScriptError::Turn {
                    turn: i + 1,
                    problem,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(turns, repeat_last)
    }

    /// Reads, parses and checks a script file.
    pub fn from_file(path: &Path) -> Result<Self, crate::Error> {
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::ReadScript {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|source| crate::Error::Script {
            path: path.to_owned(),
            source,
        })
    }

    /// The turns, in order.
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// Whether the last turn answers again past the end of the script.
    pub fn repeat_last(&self) -> bool {
        self.repeat_last
    }

    /// The turn answering a request in which `index` assistant messages came before:
    /// `None` past the end of a script without `repeat_last`.
    pub fn turn(&self, index: usize) -> Option<&Turn> {
        match self.turns.get(index) {
            Some(t) => Some(t),
            None if self.repeat_last => self.turns.last(),
            None => None,
        }
    }

    /// The script in its file format (what `--print-default-script` prints).
    pub fn to_json(&self) -> Value {
        let turns: Vec<Value> = self
            .turns
            .iter()
            .map(|t| {
                let mut o = Map::new();
                if let Some(text) = &t.text {
                    o.insert("text".into(), json!(text));
                }
                if !t.tool_use.is_empty() {
                    let calls: Vec<Value> = t
                        .tool_use
                        .iter()
                        .map(|c| json!({"name": c.name, "input": c.input}))
                        .collect();
                    o.insert("tool_use".into(), Value::Array(calls));
                }
                if t.expect_tool_result {
                    o.insert("expect_tool_result".into(), json!(true));
                }
                if !t.delay.is_zero() {
                    o.insert("delay_ms".into(), json!(t.delay.as_millis()));
                }
                Value::Object(o)
            })
            .collect();
        json!({"turns": turns, "repeat_last": self.repeat_last})
    }
}

/// One turn of the file format; the checks shared with code-built turns are in
/// [`Script::new`].
fn parse_turn(v: &Value) -> Result<Turn, TurnProblem> {
    const KNOWN: [&str; 4] = ["text", "tool_use", "expect_tool_result", "delay_ms"];
    let Value::Object(o) = v else {
        return Err(TurnProblem::NotAnObject(kind(v)));
    };
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(TurnProblem::UnknownField(k.clone()));
    }
    let text = match o.get("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(TurnProblem::TextNotString(kind(other))),
    };
    let tool_use = match o.get("tool_use") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) => calls
            .iter()
            .enumerate()
            .map(|(c, call)| parse_call(c + 1, call))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(TurnProblem::ToolUseNotArray(kind(other))),
    };
    let expect_tool_result = match o.get("expect_tool_result") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(TurnProblem::ExpectNotBool(kind(other))),
    };
    let delay = match o.get("delay_ms") {
        None => Duration::ZERO,
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= MAX_DELAY_MS => Duration::from_millis(ms),
            _ => return Err(TurnProblem::BadDelay(v.to_string())),
        },
    };
    Ok(Turn {
        text,
        tool_use,
        expect_tool_result,
        delay,
    })
}

fn parse_call(call: usize, v: &Value) -> Result<ToolCall, TurnProblem> {
    let Value::Object(o) = v else {
        return Err(TurnProblem::CallNotAnObject {
            call,
            kind: kind(v),
        });
    };
    if let Some(k) = o.keys().find(|k| !["name", "input"].contains(&k.as_str())) {
        return Err(TurnProblem::CallUnknownField {
            call,
            field: k.clone(),
        });
    }
    let name = match o.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(TurnProblem::CallWithoutName { call });
        }
        Some(other) => {
            return Err(TurnProblem::BadToolName {
                call,
                name: other.to_string(),
            });
        }
    };
    let input = match o.get("input") {
        // A tool without parameters is called with `{}`; saying so is optional.
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(TurnProblem::InputNotObject {
                call,
                kind: kind(other),
            });
        }
    };
    Ok(ToolCall { name, input })
}

/// The API's rule for client tool names: `^[a-zA-Z0-9_-]{1,64}$`. A script naming a
/// tool otherwise would make the stand-in answer what the real API never could.
fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// "a string", "an array", ...: for messages saying what was found instead.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Script::from_json(text) {
            Ok(s) => panic!("accepted {text}: {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_default_script_constant_and_function_agree() {
        let parsed = Script::from_json(DEFAULT_SCRIPT).expect("default script parses");
        assert_eq!(parsed, default_script());
        assert_eq!(
            Script::from_json(&parsed.to_json().to_string()).expect("round trip"),
            parsed
        );
    }

    #[test]
    fn a_full_script_parses() {
        let s = Script::from_json(
            r#"{"turns": [
                {"tool_use": [{"name": "write_file", "input": {"path": "hello.txt", "content": "hi"}}, {"name": "ls"}]},
                {"text": "done", "expect_tool_result": true, "delay_ms": 20}
            ], "repeat_last": true}"#,
        )
        .expect("parses");
        assert!(s.repeat_last());
        assert_eq!(s.turns().len(), 2);
        assert_eq!(s.turns()[0].tool_use[1].name, "ls");
        assert!(s.turns()[0].tool_use[1].input.is_empty());
        assert_eq!(s.turns()[1].delay, Duration::from_millis(20));
        assert_eq!(s.turn(5), s.turns().last());
    }

    #[test]
    fn turns_past_the_end_are_none_without_repeat_last() {
        let s = Script::from_json(r#"{"turns": [{"text": "one"}]}"#).expect("parses");
        assert!(s.turn(0).is_some());
        assert!(s.turn(1).is_none());
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[]", "must be a JSON object"),
            (r#"{"turn": []}"#, "unknown field `turn`"),
            (r#"{}"#, "has no `turns`"),
            (r#"{"turns": {}}"#, "`turns` must be an array"),
            (r#"{"turns": []}"#, "`turns` is empty"),
            (
                r#"{"turns": [{"text": "a"}], "repeat_last": "yes"}"#,
                "`repeat_last` must be true or false, not a string",
            ),
            (r#"{"turns": ["hi"]}"#, "turn 1: must be a JSON object"),
            (
                r#"{"turns": [{"text": "a"}, {"txt": "b"}]}"#,
                "turn 2: unknown field `txt`",
            ),
            (
                r#"{"turns": [{"text": 3}]}"#,
                "turn 1: `text` must be a string, not a number",
            ),
            (r#"{"turns": [{"text": ""}]}"#, "turn 1: `text` is empty"),
            (
                r#"{"turns": [{}]}"#,
                "turn 1: has neither `text` nor `tool_use`",
            ),
            (r#"{"turns": [{"tool_use": []}]}"#, "turn 1: has neither"),
            (
                r#"{"turns": [{"tool_use": {"name": "x"}}]}"#,
                "turn 1: `tool_use` must be an array",
            ),
            (
                r#"{"turns": [{"text": "a"}, {"tool_use": [{"input": {}}]}]}"#,
                "turn 2: tool_use without a name (call 1)",
            ),
            (
                r#"{"turns": [{"tool_use": [{"name": "a"}, {"name": ""}]}]}"#,
                "turn 1: tool_use without a name (call 2)",
            ),
            (
                r#"{"turns": [{"tool_use": [{"name": "write file"}]}]}"#,
                "turn 1: tool_use name \"write file\" must be 1-64",
            ),
            (
                r#"{"turns": [{"tool_use": [{"name": "a", "input": [1]}]}]}"#,
                "turn 1: tool_use input must be a JSON object, not an array (call 1)",
            ),
            (
                r#"{"turns": [{"tool_use": [{"name": "a", "args": {}}]}]}"#,
                "turn 1: unknown field `args` in tool_use",
            ),
            (
                r#"{"turns": [{"tool_use": ["a"]}]}"#,
                "turn 1: tool_use must be an object",
            ),
            (
                r#"{"turns": [{"text": "a", "expect_tool_result": true}]}"#,
                "turn 1: `expect_tool_result` can never hold on the first turn",
            ),
            (
                r#"{"turns": [{"text": "a"}, {"text": "b", "expect_tool_result": true}]}"#,
                "turn 2: `expect_tool_result` can never hold: the turn before it calls no tool",
            ),
            (
                r#"{"turns": [{"text": "a", "expect_tool_result": 1}]}"#,
                "turn 1: `expect_tool_result` must be true or false",
            ),
            (
                r#"{"turns": [{"text": "a", "delay_ms": -1}]}"#,
                "turn 1: `delay_ms` must be",
            ),
            (
                r#"{"turns": [{"text": "a", "delay_ms": 1.5}]}"#,
                "turn 1: `delay_ms` must be",
            ),
            (
                r#"{"turns": [{"text": "a", "delay_ms": 600001}]}"#,
                "turn 1: `delay_ms` must be a whole number of milliseconds up to 600000, not 600001",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{text}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn code_built_scripts_get_the_same_checks() {
        let bad = Turn {
            tool_use: vec![ToolCall {
                name: "a.b".into(),
                input: Map::new(),
            }],
            ..Turn::default()
        };
        let e = Script::new(vec![bad], false).expect_err("bad name");
        assert!(e.to_string().starts_with("turn 1: tool_use name"), "{e}");
        assert!(matches!(
            Script::new(vec![], false),
            Err(ScriptError::NoTurns)
        ));
    }

    #[test]
    fn tool_names_follow_the_api_rule() {
        assert!(valid_tool_name("write_file"));
        assert!(valid_tool_name("a-B_9"));
        assert!(valid_tool_name(&"x".repeat(64)));
        assert!(!valid_tool_name(&"x".repeat(65)));
        assert!(!valid_tool_name(""));
        assert!(!valid_tool_name("fichier_écrit"));
    }
}
