//! CEL `when` conditions: compiled once at load, evaluated over action, args, agent and context.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use serde_json::Value;

use super::{EvaluationInput, Facts};

const VARIABLES: [&str; 5] = ["action", "args", "agent", "context", "now"];

/// The counters `when` may call: `recent_count(DURATION)`, `recent_sum(FIELD, DURATION)`.
const RECENT_COUNT: &str = "recent_count";
const RECENT_SUM: &str = "recent_sum";

/// The standard CEL environment, built once per process rather than per evaluation.
fn environment() -> Arc<cel::Env> {
    static ENVIRONMENT: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| Arc::new(cel::Env::stdlib()))
        .clone()
}

pub struct Condition {
    source: String,
    program: cel::Program,
    /// The counters this condition calls, each with literal arguments.
    counters: Vec<CounterSpec>,
}

/// One counter a rule reads: `recent_count(window)` (no field) or `recent_sum(field, window)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CounterSpec {
    pub field: Option<String>,
    pub window: Duration,
}

impl fmt::Debug for Condition {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_tuple("Condition")
            .field(&self.source)
            .finish()
    }
}

impl Condition {
    /// Compiles `source`, refusing syntax errors and variables other than the four we bind.
    pub fn compile(source: &str) -> Result<Condition, String> {
        let program = cel::Program::compile(source)
            .map_err(|error| format!("`when` does not compile: {error}"))?;
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|name| !VARIABLES.contains(name))
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            return Err(format!(
                "`when` uses unknown variable(s) {}; available: action, args, agent, context, now",
                unknown.join(", ")
            ));
        }
        let functions = references.functions();
        let counters = if functions.contains(&RECENT_COUNT) || functions.contains(&RECENT_SUM) {
            counter_calls(source)?
        } else {
            Vec::new()
        };
        Ok(Condition {
            source: source.to_string(),
            program,
            counters,
        })
    }

    pub fn counters(&self) -> &[CounterSpec] {
        &self.counters
    }

    /// `Ok(bool)`, or the reason it could not be evaluated (missing field, wrong type,
    /// a result that is not a boolean).
    pub fn evaluate(&self, variables: &Variables) -> Result<bool, String> {
        match self.program.execute(&variables.context) {
            Ok(cel::Value::Bool(result)) => Ok(result),
            Ok(other) => Err(format!("`when` gave {other:?}, not a boolean")),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// The CEL variables for one evaluation, converted once and shared by every rule.
pub struct Variables {
    context: cel::Context<'static, 'static>,
}

impl Variables {
    /// `counters` pairs each counter the policy reads with its value for this evaluation;
    /// with `reads_counters` the counter functions exist even when none was supplied
    /// (check, explain), and then say they need history.
    pub fn new(
        input: &EvaluationInput<'_>,
        facts: &Facts<'_>,
        counters: &[(CounterSpec, f64)],
        reads_counters: bool,
    ) -> Self {
        let mut context = cel::Context::with_env(environment());
        context.add_variable_from_value("action", input.action.to_string());
        context.add_variable_from_value("agent", input.agent.to_string());
        context.add_variable_from_value("args", json_to_cel(input.args));
        context.add_variable_from_value("context", json_to_cel(input.context));
        context.add_variable_from_value("now", timestamp(facts.now));
        if reads_counters || !counters.is_empty() {
            let values: Arc<Vec<(CounterSpec, f64)>> = Arc::new(counters.to_vec());
            let count_values = values.clone();
            // Names no standard function uses, so registering them cannot conflict.
            let _ = context.add_function(RECENT_COUNT, move |window: Arc<String>| {
                counter_value(&count_values, None, &window)
            });
            let _ = context.add_function(
                RECENT_SUM,
                move |field: Arc<String>, window: Arc<String>| {
                    counter_value(&values, Some(field.as_str()), &window)
                },
            );
        }
        Self { context }
    }
}

fn timestamp(at: DateTime<Utc>) -> cel::Value {
    cel::Value::Timestamp(at.fixed_offset())
}

/// A counter's value for CEL: an int when whole (so it adds to int args), else a double.
fn counter_value(
    values: &[(CounterSpec, f64)],
    field: Option<&str>,
    window: &str,
) -> Result<cel::Value, cel::ExecutionError> {
    let name = if field.is_some() {
        RECENT_SUM
    } else {
        RECENT_COUNT
    };
    let window =
        parse_window(window).map_err(|error| cel::ExecutionError::function_error(name, error))?;
    let value = values
        .iter()
        .find(|(spec, _)| spec.window == window && spec.field.as_deref() == field)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            cel::ExecutionError::function_error(
                name,
                "needs request history, which /v1/check and policy explain do not read",
            )
        })?;
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        Ok(cel::Value::Int(value as i64))
    } else {
        Ok(cel::Value::Float(value))
    }
}

fn parse_window(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(window) if !window.is_zero() && window <= Duration::from_secs(366 * 24 * 3600) => {
            Ok(window)
        }
        Ok(_) => Err(format!(
            "window {text:?} must be more than zero and at most a year"
        )),
        Err(error) => Err(format!(
            "window {text:?} is not a duration like 1h: {error}"
        )),
    }
}

/// The counters `source` calls. Their arguments must be string literals, so intake knows
/// at load which lookups each rule needs.
fn counter_calls(source: &str) -> Result<Vec<CounterSpec>, String> {
    let mut found = Vec::new();
    for (name, arity) in [(RECENT_COUNT, 1), (RECENT_SUM, 2)] {
        let mut rest = source;
        while let Some(position) = rest.find(name) {
            let preceded_by_name = source[..source.len() - rest.len() + position]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            rest = &rest[position + name.len()..];
            let Some(arguments) = rest.trim_start().strip_prefix('(') else {
                continue;
            };
            if preceded_by_name {
                continue;
            }
            let literals = string_literals(arguments, arity).ok_or_else(|| {
                format!(
                    "{name} takes {} as string literal(s), like {}",
                    if arity == 1 {
                        "a window"
                    } else {
                        "a field and a window"
                    },
                    if arity == 1 {
                        "recent_count('1h')"
                    } else {
                        "recent_sum('amount', '24h')"
                    }
                )
            })?;
            let window = parse_window(literals.last().map_or("", String::as_str))
                .map_err(|error| format!("{name}: {error}"))?;
            let field = (arity == 2).then(|| literals[0].clone());
            if let Some(field) = &field {
                if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(format!(
                        "{name}: field {field:?} must be a top-level args key (letters, digits, '_')"
                    ));
                }
            }
            let spec = CounterSpec { field, window };
            if !found.contains(&spec) {
                found.push(spec);
            }
        }
    }
    Ok(found)
}

/// `count` comma-separated string literals closed by `)`, from just after the `(`.
fn string_literals(mut text: &str, count: usize) -> Option<Vec<String>> {
    let mut literals = Vec::new();
    for index in 0..count {
        text = text.trim_start();
        let quote = text.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let end = text[1..].find(quote)? + 1;
        literals.push(text[1..end].to_string());
        text = text[end + 1..].trim_start();
        let separator = if index + 1 == count { ')' } else { ',' };
        text = text.strip_prefix(separator)?;
    }
    Some(literals)
}

/// JSON to CEL, keeping integers as CEL ints so `args.amount > 100` compares numbers.
fn json_to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(flag) => cel::Value::Bool(*flag),
        Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                cel::Value::Int(integer)
            } else if let Some(unsigned) = number.as_u64() {
                cel::Value::UInt(unsigned)
            } else {
                cel::Value::Float(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(text) => cel::Value::String(Arc::new(text.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(fields) => {
            let map: HashMap<String, cel::Value> = fields
                .iter()
                .map(|(key, value)| (key.clone(), json_to_cel(value)))
                .collect();
            cel::Value::from(map)
        }
    }
}
