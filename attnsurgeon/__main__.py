from attnsurgeon.cli import main

main()
