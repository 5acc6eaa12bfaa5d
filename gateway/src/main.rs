fn main() {
    gateway::cli::main()
}
