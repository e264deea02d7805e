//! Generated policies of a given size, shared by the benchmark binary and the criterion bench.

use signoff::policy::Policy;

/// A policy with `rules` rules over distinct action families, plus a few that match
/// `payments.refund` (one with a CEL condition), so evaluation does real work.
pub fn generated_policy(rules: usize) -> Policy {
    let mut source = String::from(
        "version: 1\ndefault: deny\ndefault_tier: low\ntiers:\n  low:\n    approvers: [\"cli:a\"]\n  high:\n    approvers: [\"cli:a\", \"cli:b\"]\n    approvals: 2\nrules:\n",
    );
    for index in 0..rules.saturating_sub(3) {
        source.push_str(&format!(
            "  - name: family-{index}\n    match: [\"family{index}.*\", \"*.op{index}\"]\n    agents: [\"agent-{index}\"]\n    effect: require_approval\n"
        ));
    }
    source.push_str(
        "  - name: reads\n    match: [\"*.get\"]\n    effect: allow\n  - name: large-refund\n    match: [\"payments.refund\"]\n    when: \"args.amount > 100 && context.reversible == false\"\n    effect: require_approval\n    tier: high\n  - name: no-drop\n    match: [\"db.drop_*\"]\n    effect: deny\n",
    );
    Policy::parse(&source).expect("generated policy is valid")
}
