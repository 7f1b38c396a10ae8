from latentforge.cli import main

main()
