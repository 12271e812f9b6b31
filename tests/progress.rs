//! Progress bars on long work are drawn on a terminal, and nothing is drawn
//! when standard error is a pipe (a log collector, CI).

#[test]
fn progress_is_drawn_on_a_terminal_and_never_into_a_pipe() {
    let bin = env!("CARGO_BIN_EXE_backstop");
    // A pseudo-terminal from util-linux's `script` (essential on Debian).
    let tty = std::process::Command::new("script")
        .args(["-qec", &format!("{bin} demo"), "/dev/null"])
        .env_remove("BACKSTOP_PROGRESS")
        // indicatif draws nothing where TERM is unset or dumb, as a CI job's
        // environment often is; a terminal says what it is.
        .env("TERM", "xterm")
        .output()
        .expect("script (util-linux) runs the demo on a pseudo-terminal");
    let drawn = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{drawn}");
    for work in [
        "base backup",
        "restore: extracting the base backup",
        "restore: replaying WAL to ",
    ] {
        assert!(drawn.contains(work), "{work:?} drawn on a terminal:\n{drawn}");
    }

    let piped = std::process::Command::new(bin)
        .arg("demo")
        .env_remove("BACKSTOP_PROGRESS")
        .output()
        .expect("run demo");
    assert!(piped.status.success());
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !err.contains('\r') && !err.contains("extracting the base backup"),
        "{err}"
    );
}
