from lightning_tricks.cli import main

main()
