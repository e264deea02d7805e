//! Policy evaluation time for 10, 100 and 1,000 rules (criterion). Each policy mixes globs,
//! agent filters and CEL conditions; the evaluated action matches a handful of rules.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;
use signoff::policy::EvaluationInput;

#[path = "../src/bin/signoff-bench/policies.rs"]
mod policies;
use policies::generated_policy;

fn evaluation(criterion: &mut Criterion) {
    let args = json!({"amount": 2500, "currency": "EUR", "order": "A-1042"});
    let context = json!({"summary": "refund", "reversible": false});
    let mut group = criterion.benchmark_group("policy_evaluation");
    for rules in [10, 100, 1000] {
        let policy = generated_policy(rules);
        group.bench_with_input(
            BenchmarkId::from_parameter(rules),
            &policy,
            |bencher, policy| {
                bencher.iter(|| {
                    policy.evaluate(EvaluationInput {
                        action: "payments.refund",
                        args: &args,
                        agent: "finance-bot",
                        context: &context,
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, evaluation);
criterion_main!(benches);
