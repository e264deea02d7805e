//! CEL `when` conditions: compiled once at load, evaluated over action, args, agent and context.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use super::EvaluationInput;

const VARIABLES: [&str; 4] = ["action", "args", "agent", "context"];

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
                "`when` uses unknown variable(s) {}; available: action, args, agent, context",
                unknown.join(", ")
            ));
        }
        Ok(Condition {
            source: source.to_string(),
            program,
        })
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
    pub fn new(input: &EvaluationInput<'_>) -> Self {
        let mut context = cel::Context::with_env(environment());
        context.add_variable_from_value("action", input.action.to_string());
        context.add_variable_from_value("agent", input.agent.to_string());
        context.add_variable_from_value("args", json_to_cel(input.args));
        context.add_variable_from_value("context", json_to_cel(input.context));
        Self { context }
    }
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
