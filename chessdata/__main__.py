from chessdata.cli import main

main()
