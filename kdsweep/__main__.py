from kdsweep.cli import main

main(prog_name="kdsweep")
