from loadgen.cli import app

app(prog_name="spotserve-loadgen")
