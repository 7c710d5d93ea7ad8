from binderbox.cli import main

main()
