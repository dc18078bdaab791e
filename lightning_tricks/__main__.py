from lightning_tricks.commands import main

main()
