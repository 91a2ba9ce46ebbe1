# written by piku for shop (wsgi.1, generation 7)
bind = ['unix:/home/piku/.piku/uwsgi/shop/g7/wsgi.1.sock']
workers = 3
timeout = 30
graceful_timeout = 20
chdir = '/home/piku/.piku/releases/shop/20261121-abc'
accesslog = '-'
errorlog = '-'
proc_name = 'shop:wsgi.1'
control_socket_disable = True   # gunicorn >= 24 would share one socket in $HOME between apps
umask = 0o007                   # its socket: the piku user and its group (nginx), no one else
