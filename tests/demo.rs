//! `backstop demo`, as the README runs it: both runs end as designed.

#[test]
fn demo_promotes_one_migration_and_rolls_back_the_other() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("demo")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Succeeded"), "{stdout}");
    assert!(stdout.contains("RolledBack"), "{stdout}");
    assert!(
        stdout.contains("3 orders kept, column total_cents gone (schema restored)"),
        "{stdout}"
    );
    assert!(stdout.contains("**Outcome: RolledBack**"), "{stdout}");
    assert!(stdout.contains("data-loss window: writes from"), "{stdout}");
}
