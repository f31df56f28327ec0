from p2pcompute.cli import run

run()
