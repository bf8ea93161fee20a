from archtune.cli import main

main()
