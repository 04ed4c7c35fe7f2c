fn main() {
    std::process::exit(vipo::cli::main());
}
