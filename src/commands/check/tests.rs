use super::*;

#[test]
fn identifiers_are_quoted_only_when_needed() {
    assert_eq!(ident("outbox_pub"), "outbox_pub");
    assert_eq!(ident("Outbox"), "\"Outbox\"");
    assert_eq!(ident("my-pub"), "\"my-pub\"");
    assert_eq!(ident("1x"), "\"1x\"");
}

#[test]
fn render_puts_the_fix_on_the_failing_line() {
    let text = render(&[
        CheckResult::pass("wal_level", "wal_level = logical"),
        CheckResult::fail(
            "publication",
            "publication p does not exist",
            "outbox-relay setup",
        ),
    ]);
    assert_eq!(
        text,
        "PASS  wal_level    wal_level = logical\n\
         FAIL  publication  publication p does not exist; fix: outbox-relay setup\n\
         1 passed, 0 warning(s), 1 failed\n"
    );
}
