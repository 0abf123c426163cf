//! Every task template of the peer project's corpus must load (SPEC §2) and survive a
//! round trip through the current-dialect writer.
//!
//! The corpus lives outside the workspace (`../shared/peer-templates/`); when it is absent the
//! test says so and passes, so the crate can be tested on its own.

use std::path::Path;

use tasker_core::template::{collect_yaml_files, load_file, parse_str, to_yaml};

/// Files deliberately rejected, with the reason (also written up in
/// `docs/decisions/002-peer-template-rejects.md`). Paths are relative to the corpus root.
const REJECTS: &[(&str, &str)] = &[];

/// The corpus holds 140 templates; fewer than this means the walk went wrong.
const MIN_LOADED: usize = 100;

#[test]
fn every_peer_template_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peer-templates");
    if !root.is_dir() {
        println!("skipped: no peer template corpus at {}", root.display());
        return;
    }
    let files = match collect_yaml_files(&root) {
        Ok(files) => files,
        Err(e) => panic!("cannot walk {}: {e}", root.display()),
    };
    let mut loaded = 0;
    let mut rejected = 0;
    let mut warnings = 0;
    let mut failures = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(&root)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| file.display().to_string());
        let expected_reject = REJECTS.iter().find(|(path, _)| *path == relative);
        match (load_file(file, "test"), expected_reject) {
            (Ok(template), None) => {
                loaded += 1;
                warnings += template.warnings.len();
                // The current-dialect writer must reproduce every real template exactly.
                let yaml = to_yaml(&template.template);
                match parse_str(&yaml, Some(&relative), "none") {
                    Ok(again) if again.template == template.template => {}
                    Ok(_) => failures.push(format!("{relative}: changes through to_yaml")),
                    Err(e) => failures.push(format!("{relative}: to_yaml output rejected: {e}")),
                }
            }
            (Err(_), Some(_)) => rejected += 1,
            (Ok(_), Some((_, reason))) => failures.push(format!(
                "{relative}: loads, but is on the reject list ({reason}); remove it from the list"
            )),
            (Err(e), None) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "peer templates that misbehave:\n{}",
        failures.join("\n")
    );
    assert!(
        loaded > MIN_LOADED,
        "only {loaded} peer templates loaded from {}",
        root.display()
    );
    println!(
        "{loaded} peer templates loaded ({warnings} warnings), {rejected} rejected as documented"
    );
}
