fn main() {
    std::process::exit(supermachine::cli::main());
}
