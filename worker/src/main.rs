//! supermachine-worker: one VM per process. See `supermachine_worker::process`.
fn main() {
    std::process::exit(supermachine_worker::process::main());
}
