# written by piku for shop (wsgi.1); piku rewrites this file on every deploy
bind = ['127.0.0.1:8123']
reuse_port = True
workers = 3
timeout = 30
graceful_timeout = 20
chdir = '/home/piku/.piku/apps/shop'
accesslog = '/home/piku/.piku/logs/shop/wsgi.1.access.log'
errorlog = '/home/piku/.piku/logs/shop/wsgi.1.error.log'
proc_name = 'shop:wsgi.1'
control_socket_disable = True   # gunicorn >= 24 would share one socket in $HOME between apps
