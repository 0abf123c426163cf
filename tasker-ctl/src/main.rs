//! `tasker-ctl`: the Tasker command line with the bundled Rust handlers.

fn main() {
    let code = tasker_core::cli::run_cli(std::env::args_os().collect(), |tasker| {
        tasker_examples::register_handlers(tasker);
        tasker_conformance::kit::register_handlers(tasker);
    });
    std::process::exit(code);
}
