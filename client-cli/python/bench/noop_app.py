"""Tasks for bench.py (the workers load this module)."""

from raftsched import App

app = App()


@app.task
def noop(i=0):
    return i


@app.task
def step(x):
    return x + 1
