from ckpt_uploader.cli import main

main(prog_name="ckpt-uploader")
