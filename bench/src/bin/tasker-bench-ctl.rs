//! `tasker-bench-ctl`: the `tasker-ctl` command tree with the benchmark's handlers, for the
//! production benchmark's processes. `serve` registers no handlers (orchestration and the API
//! only); every other command gets `bench.add`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let serving = args.get(1).is_some_and(|a| a == "serve");
    let code = tasker_core::cli::run_cli(args, move |tasker| {
        if !serving {
            tasker_bench::register_handlers(tasker);
        }
    });
    std::process::exit(code);
}
