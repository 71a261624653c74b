from sautomed.cli import console

console()
